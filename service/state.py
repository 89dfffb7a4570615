"""What the routes share: settings, the engine, metrics, the model's description, readiness."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torchvision.transforms import v2

from models.artifact import Artifact, InputSpec, Manifest, PolicyChoice
from service.config import ServiceSettings
from service.engine import Answer, Engine
from service.errors import ApiError
from service.images import build_transform
from service.metrics import Metrics
from service.schemas import ModelView


class _Tracker:
    def __init__(self) -> None:
        self.status = 500

    def ok(self) -> None:
        self.status = 200


@dataclass
class ServiceState:
    """Shared by every request; built once by the app's lifespan."""

    settings: ServiceSettings
    artifact: Artifact
    engine: Engine
    metrics: Metrics
    device: str
    ready: bool = False
    draining: bool = False
    transform: v2.Transform = field(init=False)
    classes: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.transform = build_transform(self.input_spec)
        self.classes = list(self.manifest.classes)

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def max_pixels(self) -> int:
        return self.settings.max_image_pixels

    def require_ready(self) -> None:
        if self.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if not self.ready or not self.engine.alive:
            raise ApiError(503, "not_ready", "the model is not loaded and warmed up yet", {"Retry-After": "1"})

    @contextmanager
    def track_request(self) -> Iterator[_Tracker]:
        """Count the request by final status and time it."""
        start = time.monotonic()
        tracker = _Tracker()
        try:
            yield tracker
        except ApiError as exc:
            tracker.status = exc.status
            raise
        finally:
            self.metrics.requests.labels(status=str(tracker.status)).inc()
            self.metrics.request_latency.observe(time.monotonic() - start)

    def record_answer(self, answer: Answer, elapsed_s: float, deadline: float | None) -> None:
        """Exit, per-exit latency and deadline outcome of one answered sample."""
        exit_label = str(answer.exit)
        self.metrics.exits.labels(exit=exit_label, reason=answer.reason.value).inc()
        self.metrics.exit_latency.labels(exit=exit_label).observe(elapsed_s)
        if deadline is not None:
            met = time.monotonic() <= deadline
            self.metrics.deadlines.labels(outcome="met" if met else "missed").inc()

    def model_view(self) -> ModelView:
        """The manifest without training internals, plus the live stage-time estimates."""
        m = self.manifest
        return ModelView(
            name=m.name, version=m.version, created=m.created, architecture=m.architecture.name, dataset=m.dataset,
            classes=m.classes, input=m.input, exits=m.exits, ensemble=m.ensemble,
            policy=PolicyChoice.model_validate(m.policy.model_dump(exclude={"sweep"})), device=self.device,
            stage_ms_now=[
                {str(bs): round(s * 1e3, 4) for bs, s in sorted(t.items())} for t in self.engine.times.snapshot()
            ],
        )  # fmt: skip
