"""What the routes share: settings, metrics, the served model, readiness and draining."""

from __future__ import annotations

from dataclasses import dataclass

from service.config import ServiceSettings
from service.errors import ApiError
from service.metrics import Metrics
from service.served import ServedModel


@dataclass
class ServiceState:
    """Shared by every request; built once by the app's lifespan."""

    settings: ServiceSettings
    metrics: Metrics
    model: ServedModel
    ready: bool = False
    draining: bool = False

    def require_ready(self) -> ServedModel:
        """The model to serve, or 503 while starting or draining."""
        if self.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if not self.ready or not self.model.engine.alive:
            raise ApiError(503, "not_ready", "the model is not loaded and warmed up yet", {"Retry-After": "1"})
        return self.model
