"""Builds the FastAPI app and runs it: `anytime-serve` (settings from ANYTIME_* variables)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from models.artifact import ArtifactError
from service import oip_grpc, oip_rest
from service.api import HOT_ROUTES, meta, router
from service.config import ServiceSettings
from service.drain import CloseWhenDraining, DrainingServer
from service.errors import BodyLimitMiddleware, install_error_handlers
from service.frontdoor import FrontDoor
from service.metrics import Metrics
from service.registry import BudgetExceeded, ModelRegistry
from service.state import ServiceState

log = logging.getLogger("anytime.serve")


def resolve_device(setting: str) -> torch.device:
    """`auto` → CUDA when present, else CPU; `cuda` without a GPU is an error."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("ANYTIME_DEVICE=cuda but no CUDA GPU is available")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def start_registry(settings: ServiceSettings, metrics: Metrics) -> ModelRegistry:
    """Every model the settings name, loaded and warmed up; raises ArtifactError if the default
    model cannot be served (other models that fail are logged and counted, not fatal)."""
    registry = ModelRegistry(settings, metrics, resolve_device(settings.device))
    registry.start_sync()
    return registry


def create_app(settings: ServiceSettings, registry: ModelRegistry | None = None) -> FastAPI:
    """The app; its lifespan starts the models (if not given) and watches the model store."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg = registry or start_registry(settings, Metrics())
        state = ServiceState(settings, reg.metrics, reg)
        app.state.service = state
        watcher = None
        if settings.model_poll_s > 0:
            watcher = asyncio.create_task(reg.watch(settings.model_poll_s, lambda: state.draining))
        grpc_server = await oip_grpc.start(state, settings) if settings.grpc_port else None
        state.ready = True
        log.info("serving %s", ", ".join(f"{m.name} v{m.version} on {m.device}" for m in reg.served()))
        try:
            yield
        finally:
            state.draining = True
            if watcher is not None:
                watcher.cancel()
            if grpc_server is not None:  # new calls get UNAVAILABLE; those in flight finish
                await grpc_server.stop(grace=settings.drain_timeout_s)
            await reg.stop()

    app = FastAPI(
        title="Anytime",
        summary="Anytime inference for multi-exit image classifiers",
        version="0.1.0",
        lifespan=lifespan,
        # OpenTelemetry is off: the service exports its own Prometheus metrics, and FastAPI's
        # per-request telemetry check cost 9 % of the event loop's time under load (py-spy).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.include_router(router)
    app.include_router(meta)
    app.include_router(oip_rest.infer_router)
    app.include_router(oip_rest.router)
    install_error_handlers(app)
    return app


def asgi_app(app: FastAPI, settings: ServiceSettings) -> CloseWhenDraining:
    """What uvicorn serves: `Connection: close` while draining, the body limit, then the front door
    for the hot routes, then `app`."""
    front = FrontDoor(app, HOT_ROUTES + oip_rest.HOT_ROUTES)
    return CloseWhenDraining(BodyLimitMiddleware(front, limit=settings.max_body_bytes), app)


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
        registry = start_registry(settings, Metrics())
    except (ArtifactError, BudgetExceeded, RuntimeError) as exc:
        sys.stderr.write(f"anytime-serve: cannot serve: {exc}\n")
        return 2
    app = create_app(settings, registry)
    config = uvicorn.Config(
        asgi_app(app, settings),
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
