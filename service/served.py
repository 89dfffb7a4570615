"""One artifact being served: its engine, its preprocessing and what it answers with.

Every protocol (`/classify`, the Open Inference Protocol over REST and gRPC) turns a request
into bytes or a tensor and calls `prepare` and `infer` here; they differ only in how they parse
a request and write an answer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch
from starlette.concurrency import run_in_threadpool

from models.artifact import Artifact, InputSpec, Manifest, PolicyChoice
from models.preprocess import Preprocess
from service.config import ServiceSettings
from service.engine import Answer, DeadlineUnreachable, Engine, Job
from service.images import finish_image, open_image
from service.metrics import Metrics, ModelMetrics
from service.schemas import ModelView


class InvalidOption(ValueError):
    """A request option that does not fit this model (answered 422)."""


@dataclass
class ServedModel:
    """An artifact with a started engine; built by `start`, ended by `stop`.

    `leases` counts the requests that hold this version (ModelRegistry.lease); a version swapped
    out waits for them (`idle`) before its engine stops.
    """

    artifact: Artifact
    engine: Engine
    settings: ServiceSettings
    metrics: ModelMetrics
    transform: Preprocess = field(init=False)
    classes: list[str] = field(init=False)
    leases: int = 0
    bytes: int = 0  # the footprint the memory budget counts

    def __post_init__(self) -> None:
        self.transform = Preprocess(self.manifest.input)
        self.classes = list(self.manifest.classes)
        self._idle = asyncio.Event()

    @classmethod
    def start(
        cls, artifact: Artifact, device: torch.device, metrics: Metrics, settings: ServiceSettings
    ) -> ServedModel:
        """Build the engine, warm it up (when the settings say so) and start its worker."""
        m = artifact.manifest
        bound = metrics.for_model(m.name, m.version, str(device))
        engine = Engine(
            artifact, device, bound, settings.max_batch, settings.max_wait_ms, settings.queue_size,
            shadow_rate=settings.shadow_rate, shadow_queue=settings.shadow_queue, adapt=settings.adapt,
        )  # fmt: skip
        engine.start(warmup=settings.warmup)
        return cls(artifact, engine, settings, bound)

    def stop(self, drain_timeout_s: float) -> None:
        """Finish queued work (up to the timeout), stop the worker, drop this version's gauges."""
        self.engine.stop(drain_timeout_s)
        self.metrics.released()

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self._idle.set()

    async def idle(self, timeout_s: float) -> None:
        """Until no request holds this version (or `timeout_s` passes)."""
        while self.leases > 0:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                return

    @property
    def device(self) -> str:
        return self.metrics.device

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
    def input(self) -> InputSpec:
        return self.manifest.input

    @property
    def num_exits(self) -> int:
        return self.engine.num_exits

    async def prepare(self, data: bytes) -> torch.Tensor:
        """Encoded image → model input. Small images are decoded on the event loop (a thread hop
        costs more than decoding them); larger ones, judged by the header's pixel count, in a thread."""
        limit = self.settings.max_image_pixels
        im = open_image(data, limit)  # header only
        if im.width * im.height <= self.settings.inline_decode_pixels:
            return finish_image(im, self.input, self.transform, limit)
        return await run_in_threadpool(finish_image, im, self.input, self.transform, limit)

    async def infer(
        self,
        x: torch.Tensor,
        *,
        received: float,
        threshold: float | None = None,
        max_exit: int | None = None,
        deadline_ms: float | None = None,
        top_k: int = 1,
        probabilities: bool = False,
    ) -> Answer:
        """Run one input through the engine and record its exit, latency and deadline outcome.

        `received` is when the request arrived (`time.monotonic()`). Engine exceptions (QueueFull,
        DeadlineUnreachable, EngineFailure, EngineStopped), TimeoutError and InvalidOption
        propagate for the protocol to map to its errors.
        """
        if max_exit is not None and max_exit > self.num_exits:
            raise InvalidOption(f"max_exit: the model has {self.num_exits} exits")
        if deadline_ms is None:
            deadline_ms = self.settings.default_deadline_ms
        deadline = received + deadline_ms / 1e3 if deadline_ms is not None else None
        job = Job(x, threshold, max_exit, deadline, min(top_k, len(self.classes)), probabilities)
        future = self.engine.submit(job)
        try:
            answer: Answer = await asyncio.wait_for(future, timeout=self.settings.request_timeout_s)
        except DeadlineUnreachable:
            self.metrics.deadline("rejected")
            raise
        now = time.monotonic()
        self.metrics.answered(answer.exit, answer.reason.value, now - received)
        if deadline is not None:
            self.metrics.deadline("met" if now <= deadline else "missed")
        return answer

    def view(self) -> ModelView:
        """GET /v1/model: the manifest without training internals, plus live stage-time estimates."""
        m = self.manifest
        return ModelView(
            name=m.name, version=m.version, created=m.created, architecture=m.architecture.name, dataset=m.dataset,
            classes=m.classes, input=m.input, exits=m.exits, ensemble=m.ensemble,
            policy=PolicyChoice.model_validate(m.policy.model_dump(exclude={"sweep"})), device=self.device,
            stage_ms_now=[
                {str(bs): round(s * 1e3, 4) for bs, s in sorted(t.items())} for t in self.engine.times.snapshot()
            ],
            thresholds_in_force=self.engine.thresholds.tolist(), shadow_agreement=self.engine.guard.agreement(),
        )  # fmt: skip
