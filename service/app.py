"""Builds the app: the FastAPI routes and middleware over one data plane, and the registry it serves.

Process-model agnostic: one process (service/main.py) and every request process
(service/workers/children.py) build the same app; only the registry differs. Imports nothing
from service/workers/.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from service import __version__
from service.config import ServiceSettings
from service.dataplane import DataPlane
from service.drain import CloseWhenDraining
from service.errors import INVALID_OPTION, ServiceError, internal_error, to_error
from service.metrics import Metrics
from service.protocols import ROUTES, classify, v2_grpc, v2_rest
from service.protocols.routes import BodyLimit, FrontDoor, install
from service.registry import ModelRegistry
from service.warmup import warm_request_paths

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
        lag = asyncio.create_task(plane.lag.run())  # after start-up, whose blocking steps are no request's wait
        plane.serve()
        if not getattr(app.state, "ready_after_startup", False):  # no server to warm its socket (tests)
            plane.become_ready()
        try:
            yield
        finally:
            plane.drain()
            background.cancel()
            lag.cancel()
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
