"""Builds the app and runs it: `anytime-serve` (settings from ANYTIME_* variables)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from models.artifact import ArtifactError
from service import __version__
from service.config import ServiceSettings
from service.dataplane import DataPlane
from service.drain import CloseWhenDraining, DrainingServer
from service.errors import INVALID_OPTION, ServiceError, internal_error, to_error
from service.metrics import Metrics
from service.protocols import ROUTES, classify, v2_grpc, v2_rest
from service.protocols.routes import BodyLimit, FrontDoor, install
from service.registry import BudgetExceeded, ModelRegistry
from service.warmup import warm_request_paths

log = logging.getLogger("anytime.serve")


def resolve_device(setting: str) -> torch.device:
    """`auto` → CUDA when present, else CPU; `cuda` without a GPU is an error."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("ANYTIME_DEVICE=cuda but no CUDA GPU is available")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def resolve_workers(settings: ServiceSettings) -> int:
    """ANYTIME_WORKERS, or by default one request process on CPU (the engine needs the other core) and half
    the cores, from 2 to 8, in front of a GPU (docs/server.md, "Process model")."""
    if settings.workers:
        return settings.workers
    if resolve_device(settings.device).type != "cuda":
        return 1
    return min(8, max(2, (os.cpu_count() or 2) // 2))


def start_registry(settings: ServiceSettings, metrics: Metrics, engine_process: bool = False) -> ModelRegistry:
    """Every model the settings name, loaded and warmed up; raises ArtifactError if the default
    model cannot be served (other models that fail are logged and counted, not fatal)."""
    registry = ModelRegistry(settings, metrics, resolve_device(settings.device), engine_process)
    registry.start_sync()
    return registry


def _install_error_handlers(app: FastAPI) -> None:
    """Requests that match no route (404, 405) are answered in the protocol their path belongs to."""

    async def handle(request: Request, exc: Exception) -> Response:
        error = to_error(exc)
        if isinstance(exc, RequestValidationError):
            error = ServiceError(str(exc), INVALID_OPTION)
        if error is None:
            log.exception("unhandled error", exc_info=exc)
            error = internal_error()
        path = request.url.path
        render = v2_rest.render if path == "/v2" or path.startswith("/v2/") else classify.render
        return render(error)

    for exc_class in (HTTPException, RequestValidationError, Exception):
        app.add_exception_handler(exc_class, handle)


def build(
    settings: ServiceSettings, registry: ModelRegistry | None = None, front_door: bool = True
) -> tuple[FastAPI, ASGIApp]:
    """The FastAPI app (its lifespan starts the models if none are given, gRPC, the store watcher and the
    request-path warm-up) and what uvicorn serves: `Connection: close` while draining, the body limit, the
    front door for the hot routes (unless `front_door` is false), then the app."""
    stack: ASGIApp | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg = registry or start_registry(settings, Metrics())
        plane = DataPlane(settings, reg.metrics, reg)
        app.state.plane = plane
        background = asyncio.create_task(reg.background(lambda: plane.draining))
        await reg.wait_connected()
        grpc_server = await v2_grpc.start(plane, settings) if settings.grpc_port else None
        if settings.warmup:
            assert stack is not None
            await warm_request_paths(stack, plane)
        plane.serving = True
        if not getattr(app.state, "ready_after_startup", False):  # no server to warm its socket (tests)
            plane.become_ready()
        try:
            yield
        finally:
            plane.draining = True
            background.cancel()
            if grpc_server is not None:  # new calls get UNAVAILABLE; those in flight finish
                await grpc_server.stop(grace=settings.drain_timeout_s)
            await reg.stop()

    app = FastAPIOffline(
        title="Anytime",
        summary="Anytime inference for multi-exit image classifiers",
        version=__version__,
        lifespan=lifespan,
        static_url="/docs-assets",  # Swagger UI and ReDoc served from the package, no CDN
        # OpenTelemetry is off: the service exports its own Prometheus metrics, and FastAPI's
        # per-request telemetry check cost 9 % of the event loop's time under load (py-spy).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install(app, ROUTES)
    _install_error_handlers(app)
    inner: ASGIApp = FrontDoor(app, ROUTES) if front_door else app
    stack = CloseWhenDraining(BodyLimit(inner, limit=settings.max_body_bytes), app)
    return app, stack


def main() -> int:
    """Entry point of `anytime-serve`."""
    try:
        settings = ServiceSettings()
    except ValidationError as exc:
        sys.stderr.write(f"anytime-serve: invalid settings:\n{exc}\n")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(settings.torch_threads)
    try:
        workers = resolve_workers(settings)
    except RuntimeError as exc:
        sys.stderr.write(f"anytime-serve: cannot serve: {exc}\n")
        return 2
    if workers > 1:
        from service.workers.supervisor import Supervisor

        return Supervisor(settings, workers).run()
    try:
        registry = start_registry(settings, Metrics())
    except (ArtifactError, BudgetExceeded, RuntimeError) as exc:
        sys.stderr.write(f"anytime-serve: cannot serve: {exc}\n")
        return 2
    app, stack = build(settings, registry)
    config = uvicorn.Config(
        stack,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        access_log=False,
        http="httptools",  # C parser and event loop: 12 % lower single-client latency than h11/asyncio
        loop="uvloop",
        proxy_headers=False,  # nothing uses client addresses; one ASGI layer less per request
    )
    server = DrainingServer(config, app, settings.drain_grace_s)
    # uvicorn re-raises the signal that stopped it once it has drained; these handlers take it
    # so a graceful SIGTERM ends with exit code 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
