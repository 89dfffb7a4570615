"""A model version being served: what every protocol needs of it, and the local kind with its own engine.

`Served` holds what comes from the manifest (classes, input spec, preprocessing), the request
leases that keep a replaced version alive until its requests finish, and `prepare` (image bytes →
input tensor). `ServedModel` adds an engine in this process; `service/workers/remote.py` has the
kind whose engine lives in the engine process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

import torch
from starlette.concurrency import run_in_threadpool

from models.artifact import Artifact, InputSpec, Manifest, PolicyChoice
from models.preprocess import Preprocess
from service.config import ServiceSettings
from service.engine import Answer, Engine, EngineConfig, Job
from service.images import finish_image, open_image
from service.metrics import Metrics, ModelMetrics
from service.options import InferenceOptions
from service.schemas import Brownout, ModelView


def engine_config(settings: ServiceSettings) -> EngineConfig:
    """The engine's part of the server's settings. On a CPU the worker thread yields the core to the event
    loops (`worker_nice`): this process's in one process, the request processes' beside an engine process."""
    return EngineConfig(
        worker_nice=settings.worker_nice,
        fair_when_shared=settings.workers <= 1,  # beside request processes, they are the neighbours it yields to
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        queue_size=settings.queue_size,
        aging_ms=settings.aging_ms,
        shadow_rate=settings.shadow_rate,
        shadow_queue=settings.shadow_queue,
        adapt=settings.adapt,
        cuda_graphs=settings.cuda_graphs,
        overload=settings.overload,
        brownout_floor_pp=settings.brownout_floor_pp,
        default_priority=settings.default_priority,
        priority_step_ms=settings.priority_step_ms,
        keep_warm_ms=keep_warm_ms(settings),
    )


def keep_warm_ms(settings: ServiceSettings) -> float:
    """The keep-warm period: as set, else 10 ms in one process and off beside request processes. There the
    engine process idles while the request processes, on the same cores, parse and answer, and a job that
    finds a keep-warm run at nice 10 waits for it on a busy core: at 10 ms budgets it cost 3-36 points
    of requests in time at 94-378 req/s (docs/server.md, "Deadlines")."""
    if settings.keep_warm_ms is not None:
        return settings.keep_warm_ms
    return 10.0 if settings.workers <= 1 else 0.0


class EngineClient(Protocol):
    """The one boundary between the data plane and an engine, whatever the process model: the `Engine`
    itself in one process, `RemoteEngine` (service/workers/remote.py) over the link to the engine
    process. Both raise the engine's typed errors (QueueFull, DeadlineUnreachable, EngineStopped,
    EngineFailure); called on the event loop."""

    num_exits: int

    @property
    def alive(self) -> bool: ...

    def precheck(self, options: InferenceOptions) -> None:
        """Refuse before decoding what admission would refuse."""

    def submit(self, job: Job) -> asyncio.Future:
        """Admit `job`; the future completes with its Answer or the engine's error."""

    def passed(self, job: Job) -> bool:
        """Whether `job` has passed an exit that `answer_now` can answer from."""

    def answer_now(self, job: Job) -> Answer:
        """The answer from the last exit passed (reason `deadline`); DeadlineUnreachable if none."""


class Served(ABC):
    """A served version as the protocols see it. `leases` counts the requests that hold it."""

    engine: EngineClient

    def __init__(self, manifest: Manifest, settings: ServiceSettings, metrics: ModelMetrics) -> None:
        self.manifest, self.settings, self.metrics = manifest, settings, metrics
        self.transform = Preprocess(manifest.input)
        self.classes = list(manifest.classes)
        self.leases = 0
        self.bytes = 0  # the footprint the memory budget counts
        self._idle = asyncio.Event()
        self._lock = threading.Lock()  # leases taken from other threads (the engine process's links)

    def acquire(self) -> None:
        with self._lock:
            self.leases += 1

    def release(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """One lease less; from another thread, pass the event loop that waits in `idle`."""
        with self._lock:
            self.leases -= 1
            idle = self.leases == 0
        if idle:
            if loop is None:
                self._idle.set()
            else:
                loop.call_soon_threadsafe(self._idle.set)

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

    @abstractmethod
    async def view(self) -> ModelView:
        """GET /v1/model: the manifest without training internals, plus the engine's live figures."""


M = TypeVar("M", bound=Served)


@asynccontextmanager
async def held(model: M, metrics: Metrics) -> AsyncIterator[M]:
    """`model` held by one request (a swap waits for it to finish), counted in `anytime_inflight`."""
    model.acquire()
    metrics.inflight.inc()
    try:
        yield model
    finally:
        metrics.inflight.dec()
        model.release()


class ServedModel(Served):
    """An artifact with a started engine in this process; built by `start`, ended by `stop`."""

    def __init__(self, artifact: Artifact, engine: Engine, settings: ServiceSettings, metrics: ModelMetrics) -> None:
        super().__init__(artifact.manifest, settings, metrics)
        self.artifact = artifact
        self.engine: Engine = engine

    @classmethod
    def start(
        cls,
        artifact: Artifact,
        device: torch.device,
        metrics: Metrics,
        settings: ServiceSettings,
    ) -> ServedModel:
        """Build the engine, capture its graphs and warm it up (when the settings say so), start its worker."""
        m = artifact.manifest
        bound = metrics.for_model(m.name, m.version, str(device))
        engine = Engine(artifact, device, bound, engine_config(settings))
        engine.start(warmup=settings.warmup)
        return cls(artifact, engine, settings, bound)

    def stop(self, drain_timeout_s: float) -> None:
        """Finish queued work (up to the timeout), stop the worker, drop this version's gauges."""
        self.engine.stop(drain_timeout_s)
        self.metrics.released()

    async def view(self) -> ModelView:
        return self.describe()

    def describe(self) -> ModelView:
        """GET /v1/model: the manifest without training internals, plus the engine's live figures."""
        m = self.manifest
        engine = self.engine
        return ModelView(
            name=m.name,
            version=m.version,
            created=m.created,
            architecture=m.architecture.name,
            dataset=m.dataset,
            classes=m.classes,
            input=m.input,
            exits=m.exits,
            ensemble=m.ensemble,
            policy=PolicyChoice.model_validate(m.policy.model_dump(exclude={"sweep"})),
            device=self.device,
            stage_ms_now=[{str(bs): round(s * 1e3, 4) for bs, s in sorted(t.items())} for t in engine.times.snapshot()],
            admission_slowdown=round(engine.scheduler.slowdown.factor(time.monotonic()), 3),
            in_flight_limit=round(engine.scheduler.limit.value, 2),
            thresholds_in_force=engine.thresholds.tolist(),
            shadow_agreement=engine.guard.agreement(),
            brownout=Brownout(
                mode=engine.config.overload,
                level=engine.brownout.level,
                max_exit_in_force=engine.brownout.max_exit,
                floor_exit=engine.brownout.floor,
            ),
        )
