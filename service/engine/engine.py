"""One model's engine and its lifecycle: built from an artifact, warmed up, started, stopped.

The engine composes the parts, each in its own module: stage queues (scheduler.py), admission with
the brownout (admission.py), the worker loop (worker.py), a stage runner (runner.py), stage times
(timing.py), answers (answers.py) and the drift guard's shadow checks. It lives in the process
that owns the device: the server's own with one request process, the engine process with several.
`submit` and `precheck` run on the event loop (one process) or a link's reader thread (engine
process); `start`, `stop` on the thread that manages the registry; the worker on its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from models.artifact import Artifact
from models.exit_policy import MAX_EXIT
from service.engine.admission import Admission, Holds, unreached
from service.engine.answers import answer_chunk, answer_passed
from service.engine.brownout import Brownout, floor_exit
from service.engine.drift import DriftGuard
from service.engine.jobs import Answer, EngineStopped, Job, LoopSink, Outcome, Sink, settle
from service.engine.priority import Baton
from service.engine.runner import CudaGraphRunner, EagerRunner, default_buckets
from service.engine.scheduler import Chunk, Forecast, Scheduler
from service.engine.shadow import ShadowChecks
from service.engine.timing import StageTimes
from service.engine.worker import Worker
from service.metrics import ModelMetrics
from service.options import InferenceOptions

log = logging.getLogger("anytime.engine")
DRAIN_POLL_S = 0.005  # how often `stop` looks whether the queued work is done
JOIN_SLACK_S = 5.0  # how long past the drain timeout `stop` waits for the worker thread
WARMUP_ROUNDS = 3  # runs per stage and batch size at warm-up; the median is the estimate


@dataclass(frozen=True)
class EngineConfig:
    """How an engine batches, queues and degrades (from the server's settings)."""

    max_batch: int = 32
    max_wait_ms: float = 0.0
    queue_size: int = 256
    aging_ms: float = 20.0
    shadow_rate: float = 0.0
    shadow_queue: int = 64
    adapt: bool = False
    cuda_graphs: bool = True
    overload: Literal["shed", "degrade"] = "shed"
    brownout_floor_pp: float = 2.0
    default_priority: int = 1  # requests above this level (a smaller number) are the last a brownout degrades
    priority_step_ms: float = 0.0  # each level below the highest counts as this much less urgent
    worker_nice: int = 0  # CPU: how many nice steps below its starting thread the worker runs (it shares the cores)
    # CPU, worker_nice > 0: a second worker thread without it takes the steps while other processes keep the
    # worker's cores busy (service/engine/priority.py); off where the neighbours are the server's own processes
    fair_when_shared: bool = False
    keep_warm_ms: float = 0.0  # CPU: while requests come in, an idle worker runs stage 1 this often (0: never)


class Engine:
    """Runs an artifact's network stage by stage for the rows of every queued job."""

    def __init__(
        self, artifact: Artifact, device: torch.device, metrics: ModelMetrics, config: EngineConfig | None = None
    ) -> None:
        config = config or EngineConfig()
        manifest = artifact.manifest
        self.config, self.input, self.device, self.metrics = config, manifest.input, device, metrics
        self.max_batch = config.max_batch
        self.num_exits = artifact.model.num_exits
        temperatures = [e.temperature for e in manifest.exits]
        measure = manifest.policy.confidence
        if device.type == "cuda" and config.cuda_graphs:
            buckets = default_buckets(config.max_batch)
            self.runner: EagerRunner = CudaGraphRunner(artifact.model, device, temperatures, measure, buckets)
        else:
            self.runner = EagerRunner(artifact.model, device, temperatures, measure)
        self.model = self.runner.model
        self.thresholds = np.array([e.threshold for e in manifest.exits], dtype=np.float64)
        self.times = StageTimes.from_manifest(manifest.exits)
        self.scheduler = Scheduler(
            self.num_exits,
            config.max_batch,
            self.times,
            self.runner.bucket,
            config.aging_ms / 1e3,
            config.queue_size,
            config.max_wait_ms / 1e3,
            config.priority_step_ms / 1e3,
        )
        floor = floor_exit([e.val_accuracy for e in manifest.exits], config.brownout_floor_pp)
        self.brownout = Brownout(self.num_exits, floor, config.overload == "degrade")
        self.holds = Holds()  # the requests the check before decoding let through, until submitted
        self.admission = Admission(self.scheduler, self.brownout, config.queue_size, self._cut, config.default_priority)
        self._admitted: Callable[[int], None] | None = None  # the engine process's board (`publish`)
        epsilon = (manifest.policy.epsilon_pp or 0.0) / 100
        expected = [e.expected_agreement for e in manifest.exits]
        self.guard = DriftGuard(self.thresholds, expected, epsilon, config.adapt, on_change=self.set_thresholds)
        self.shadow = ShadowChecks(
            self.model, self.runner.to_device, config.shadow_rate, config.shadow_queue, metrics, self.guard
        )
        metrics.set_expected(expected)
        metrics.set_thresholds(self.thresholds.tolist())
        metrics.set_brownout(0, self.num_exits)
        self._cond = threading.Condition()
        self.worker = Worker(
            self.runner,
            self.scheduler,
            self.admission,
            self.times,
            self.shadow,
            metrics,
            self._cond,
            lambda: self.thresholds,
            config.max_wait_ms / 1e3,
        )
        self._thread: threading.Thread | None = None
        self._fair_thread: threading.Thread | None = None
        self._sinks: dict[asyncio.AbstractEventLoop, LoopSink] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> None:
        """Capture CUDA graphs, warm up (so the first request pays no one-off costs) and start the worker."""
        self._capture()
        if warmup:
            self.warmup()
        nice = self.config.worker_nice if self.device.type == "cpu" else 0
        if self.device.type == "cpu" and self.config.keep_warm_ms > 0:
            blank = self.runner.load([torch.zeros(self.input.channels, self.input.size, self.input.size)])
            self.worker.keep_warm(self.config.keep_warm_ms / 1e3, blank)
        name = f"anytime-worker-{self.device}"
        self._thread = threading.Thread(target=self.worker.loop, args=(nice,), name=name, daemon=True)
        if nice and self.config.fair_when_shared:
            self.worker.baton = Baton(os.sched_getaffinity(0))
            self._fair_thread = threading.Thread(target=self.worker.loop, args=(0,), name=f"{name}-fair", daemon=True)
            self._fair_thread.start()
        self._thread.start()

    def _capture(self) -> None:
        """The CUDA graphs, once: the worker and the in-process `run` both replay them."""
        if isinstance(self.runner, CudaGraphRunner) and not self.runner.graphs:
            self.runner.capture((self.input.channels, self.input.size, self.input.size))

    def warmup(self, rounds: int = WARMUP_ROUNDS) -> None:
        """Run every stage at batch 1 and at the largest batch, then measure each stage's time there,
        so that deadline predictions start from this machine's figures."""
        self._capture()
        shape = (self.input.channels, self.input.size, self.input.size)
        sizes = sorted({self.runner.bucket(1), self.runner.bucket(self.max_batch)})
        self.runner.warmup(shape, sizes, rounds)
        for bs in sizes:
            h = self.runner.load([torch.zeros(*shape)] * bs)
            for k in range(self.num_exits):
                took = []
                for _ in range(rounds):
                    t0 = time.monotonic()
                    out = self.runner.run(k, h)
                    took.append(time.monotonic() - t0)
                self.times.set(k, bs, sorted(took)[len(took) // 2])  # the median: one slow run is no estimate
                if out.h is not None:
                    h = out.h

    def stop(self, drain_timeout_s: float) -> None:
        """Finish queued work for up to `drain_timeout_s`, then fail whatever is left, and stop."""
        end = time.monotonic() + drain_timeout_s
        with self._cond:
            self.admission.stopping = True  # no new work from here on
            if self.worker.on_step is not None:
                self.worker.on_step()
        while time.monotonic() < end:
            with self._cond:
                if self.scheduler.queued == 0 and not self.worker.busy:
                    break
            time.sleep(DRAIN_POLL_S)
        self.worker.stop.set()
        with self._cond:
            self._cond.notify_all()
        if self.worker.baton is not None:
            self.worker.baton.release()
        for thread in (self._thread, self._fair_thread):
            if thread is not None:
                thread.join(timeout=max(0.0, end - time.monotonic()) + JOIN_SLACK_S)
        with self._cond:
            jobs, chunks = self.scheduler.drain()
        stopped = EngineStopped("the server is shutting down")
        settle([(j, stopped) for j in jobs] + [(j, stopped) for c in chunks for j in c.jobs])

    def set_thresholds(self, thresholds: np.ndarray) -> None:
        """Thresholds in force from now on (the drift guard's adaptation); one reference swap."""
        self.thresholds = thresholds
        self.metrics.set_thresholds(thresholds.tolist())
        log.info("thresholds in force: %s", ", ".join(f"{t:.4f}" for t in thresholds))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- jobs ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future:
        """Admit `job` and return the future its answer will complete (on the calling event loop).

        Raises QueueFull (503) when the queues are full or exit 1 is predicted too late for the
        deadline, DeadlineUnreachable (504) when the deadline has passed, EngineStopped (503)."""
        loop = asyncio.get_running_loop()
        sink = self._sinks.get(loop)
        if sink is None:
            sink = self._sinks[loop] = LoopSink(loop)
        job.future = loop.create_future()
        self.submit_to(job, sink)
        return job.future

    def submit_to(self, job: Job, sink: Sink, checked: bool = False) -> None:
        """Admit `job`, whose answer goes to `sink`; raises like `submit`. `checked`: a request process's check
        before decoding let it through and held its place (a job this engine's own check let through counts
        as checked as well)."""
        job.sink = sink
        now = time.monotonic()
        with self._cond:
            self.admission.admit(job, now, checked=self.holds.release(job.options) or checked)
            self.metrics.queue_depth.set(self.scheduler.queued)
            if self._admitted is not None:
                self._admitted(self.scheduler.in_flight)
            self._cond.notify()

    def precheck(self, options: InferenceOptions) -> None:
        """Refuse now what admission would refuse, before the caller decodes the input; what it lets
        through holds a place until submitted (admission.py)."""
        now = time.monotonic()
        with self._cond:
            self.admission.precheck(options, now, self.holds.count(now))
            self.holds.add(options, now)

    def publish(self, write: Callable[[], None] | None, admitted: Callable[[int], None] | None = None) -> None:
        """Call `write` (under the lock) now, after every worker step and when the engine stops, and
        `admitted` with the jobs in flight after every admission: how the engine process keeps its request
        processes' forecasts current (None: stop)."""
        with self._cond:
            self.worker.on_step = write
            self._admitted = admitted if write is not None else None
            if write is not None:
                write()

    def forecast(self) -> Forecast:
        """The figures a request process's check before decoding uses (under the lock)."""
        b = self.brownout
        f = self.scheduler.forecast(time.monotonic(), deep=not (b.enabled and b.max_exit > b.floor))
        f.stopping = self.admission.stopping
        return f

    def passed(self, job: Job) -> bool:
        """Whether `job` has passed an exit to answer from at its deadline."""
        return job.passed is not None

    def answer_now(self, job: Job) -> Answer:
        """The answer at the job's deadline, from the last exit it passed (reason `deadline`); raises
        DeadlineUnreachable if no exit was reached."""
        answer = answer_passed(job, time.monotonic())
        if answer is None:
            exit1_s = self.scheduler.cost(0, 1)
            raise unreached("no exit was reached by the deadline", job.options, exit1_s, job.started)
        return answer

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """Serve `jobs` in the calling thread through the same scheduler and runner (no queue thread, no
        futures): the in-process path of the benchmarks."""
        self._capture()
        outcomes: dict[int, Outcome] = {}

        def deliver(settled: list[tuple[Job, Outcome]]) -> None:
            outcomes.update((id(j), v) for j, v in settled)

        with self._cond:
            for job in jobs:
                job.max_exit = job.options.max_exit
                self.scheduler.add(job)
        while len(outcomes) < len(jobs):
            if not self.worker.step(deliver):
                break
        return [outcomes.get(id(j), EngineStopped("not answered")) for j in jobs]

    def _cut(self, cut: list[Chunk]) -> None:
        """Under the lock: the brownout moved; publish it and answer the rows it cut from the exit they passed."""
        self.metrics.set_brownout(self.brownout.level, self.brownout.max_exit)
        if cut:
            now = time.monotonic()
            settle([pair for c in cut for pair in answer_chunk(c, MAX_EXIT, now)])
