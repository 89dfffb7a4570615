"""What the routes share: settings, metrics, the model registry, readiness and draining."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.requests import Request

from service.config import ServiceSettings
from service.errors import ApiError
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.served import ServedModel


@dataclass
class ServiceState:
    """Shared by every request; built once by the app's lifespan."""

    settings: ServiceSettings
    metrics: Metrics
    registry: ModelRegistry
    ready: bool = False
    draining: bool = False

    def check_ready(self) -> None:
        """Readiness: 503 while starting or draining."""
        if self.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        self.check_serving()

    def check_serving(self) -> None:
        """503 until the models are warm. A draining server still answers what reaches it: only
        /readyz turns 503, so balancers stop sending before the listener closes (service/drain.py)."""
        if not self.ready:
            raise ApiError(503, "not_ready", "the models are not loaded and warmed up yet", {"Retry-After": "1"})

    @asynccontextmanager
    async def lease(
        self, request: Request, name: str | None = None, version: str | None = None
    ) -> AsyncIterator[ServedModel]:
        """The model a request is served by (404 if not served), held until the request ends."""
        self.check_serving()
        async with self.registry.lease(name, version) as model:
            request.state.served = model  # for the request counter's model and version labels
            if not model.engine.alive:
                raise ApiError(503, "not_ready", f"model {model.name} is not running", {"Retry-After": "1"})
            yield model
