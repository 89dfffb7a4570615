"""`anytime-serve`: settings from ANYTIME_* variables, and the process model, chosen here and only here.

One request process (the default on a CPU): the app and the engine in this process. Several
(ANYTIME_WORKERS > 1, the default on CUDA): this process becomes the supervisor of an engine
process and the request processes (service/workers/supervisor.py). Both serve the same app
(service/app.py) through the same engine boundary (service/served.py, `EngineClient`).
"""

from __future__ import annotations

import logging
import os
import signal

import torch
from pydantic import ValidationError

from models.artifact import ArtifactError
from service.app import build, resolve_device, start_registry
from service.config import ServiceSettings
from service.drain import draining_server
from service.exits import FAILED, OK, cannot_serve
from service.metrics import Metrics
from service.registry import BudgetExceeded
from service.workers.supervisor import Supervisor

MAX_GPU_WORKERS = 8  # request processes in front of a GPU by default, at most


def resolve_workers(settings: ServiceSettings) -> int:
    """ANYTIME_WORKERS, or by default one request process on CPU (the engine needs the other core) and half
    the cores, from 2 to 8, in front of a GPU (docs/server.md, "Process model")."""
    if settings.workers:
        return settings.workers
    if resolve_device(settings.device).type != "cuda":
        return 1
    return min(MAX_GPU_WORKERS, max(2, (os.cpu_count() or 2) // 2))


def main() -> int:
    """Entry point of `anytime-serve`."""
    try:
        settings = ServiceSettings()
    except ValidationError as exc:
        return cannot_serve(f"invalid settings:\n{exc}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(settings.torch_threads)
    try:
        workers = resolve_workers(settings)
    except RuntimeError as exc:
        return cannot_serve(f"cannot serve: {exc}")
    if workers > 1:
        return Supervisor(settings, workers).run()
    try:
        registry = start_registry(settings, Metrics())
    except (ArtifactError, BudgetExceeded, RuntimeError) as exc:
        return cannot_serve(f"cannot serve: {exc}")
    app, stack = build(settings, registry)
    server = draining_server(settings, app, stack)
    # uvicorn re-raises the signal that stopped it once it has drained; these handlers take it
    # so a graceful SIGTERM ends with exit code 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return OK if server.started else FAILED


if __name__ == "__main__":
    raise SystemExit(main())
