"""The anytime engine: a bounded queue, one worker thread per device, stage-wise batched execution.

The worker takes up to `max_batch` jobs (or those that arrive within `max_wait_ms`), runs
stage 1 and exit 1 for all of them, applies the exit rule (`models/exit_policy.py`) to the
whole batch at once, answers the samples that stop, and runs the next stage only on the rest
(`index_select`). The asyncio loop never runs the model: it enqueues a job and awaits its
future; the worker settles every answer of a stage with one call into the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from models.artifact import Artifact
from models.confidence import confidence_of, probabilities
from models.exit_policy import CONFIDENCE, GO_ON, NO_DEADLINE, NO_MAX_EXIT, REASONS, Reason, decide, reachable
from service.drift import DriftGuard
from service.metrics import ModelMetrics
from service.shadow import ShadowChecks
from service.timing import StageTimes

log = logging.getLogger("anytime.engine")


class QueueFull(Exception):
    """The job queue is full; the caller should retry later."""


class DeadlineUnreachable(Exception):
    """The deadline had passed, or exit 1 could not be reached in time; nothing was computed."""


class EngineFailure(Exception):
    """The model failed on the batch that held this job."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no more work."""


@dataclass(slots=True)
class Job:
    """One image waiting for an answer. `deadline` is on the `time.monotonic()` clock."""

    x: Tensor
    threshold: float | None = None
    max_exit: int | None = None
    deadline: float | None = None
    top_k: int = 1
    probabilities: bool = False  # also return the whole calibrated probability vector
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None


@dataclass(slots=True)
class Answer:
    """What the engine found for one job."""

    index: int
    confidence: float
    exit: int  # 1-based
    reason: Reason
    top_k: list[tuple[int, float]]
    queue_s: float
    compute_s: float
    probabilities: list[float] | None = None


Outcome = Answer | BaseException
Deliver = Callable[[list[tuple["Job", Outcome]]], None]


def _apply(settled: list[tuple[Job, Outcome]]) -> None:
    """On the event loop: complete each job's future (unless its client went away)."""
    for job, value in settled:
        future = job.future
        if future is None or future.done():
            continue
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


def settle(settled: list[tuple[Job, Outcome]]) -> None:
    """From the worker thread: complete futures with one call into each event loop involved."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Outcome]]] = {}
    for job, value in settled:
        if job.loop is not None:
            by_loop.setdefault(job.loop, []).append((job, value))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_apply, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _column(values: list[float | int | None], missing: float) -> np.ndarray | None:
    """`values` as an array with `missing` for None, or None when every value is None."""
    if all(v is None for v in values):
        return None
    return np.array([missing if v is None else v for v in values], dtype=np.float64)


class Engine:
    """Runs an artifact's network stage by stage for batches of queued jobs."""

    def __init__(
        self,
        artifact: Artifact,
        device: torch.device,
        metrics: ModelMetrics,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        queue_size: int = 256,
        shadow_rate: float = 0.0,
        shadow_queue: int = 64,
        adapt: bool = False,
    ) -> None:
        manifest = artifact.manifest
        self.model = artifact.model.to(device).eval()
        self.input = manifest.input
        self.device = device
        self.metrics = metrics
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1e3
        self.num_exits = self.model.num_exits
        self.temperatures = [e.temperature for e in manifest.exits]
        self.thresholds = np.array([e.threshold for e in manifest.exits], dtype=np.float64)
        self.measure = manifest.policy.confidence
        self.times = StageTimes.from_manifest(manifest.exits)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._stage_hist = [metrics.stage(k) for k in range(self.num_exits)]
        epsilon = (manifest.policy.epsilon_pp or 0.0) / 100
        expected = [e.expected_agreement for e in manifest.exits]
        self.guard = DriftGuard(self.thresholds, expected, epsilon, adapt, on_change=self.set_thresholds)
        self.shadow = ShadowChecks(self.model, self._to_device, shadow_rate, shadow_queue, metrics, self.guard)
        metrics.set_expected(expected)
        metrics.set_thresholds(self.thresholds.tolist())
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> None:
        """Warm up (so the first request pays no one-off costs) and start the worker thread."""
        if warmup:
            self.warmup()
        self._thread = threading.Thread(target=self._work, name=f"anytime-worker-{self.device}", daemon=True)
        self._thread.start()

    def warmup(self, rounds: int = 3) -> None:
        shape = (self.input.channels, self.input.size, self.input.size)
        for bs in sorted({1, self.max_batch}):
            x = torch.zeros(bs, *shape)
            for _ in range(rounds):
                self._run_all_stages(x)

    def stop(self, drain_timeout_s: float) -> None:
        """Finish queued work for up to `drain_timeout_s`, then fail whatever is left, and stop."""
        end = time.monotonic() + drain_timeout_s
        while not self._queue.empty() and time.monotonic() < end:
            time.sleep(0.01)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, end - time.monotonic()) + 5)
        left: list[tuple[Job, Outcome]] = []
        while True:
            try:
                left.append((self._queue.get_nowait(), EngineStopped("the server is shutting down")))
            except queue.Empty:
                break
        settle(left)

    def set_thresholds(self, thresholds: np.ndarray) -> None:
        """Thresholds in force from now on (the drift guard's adaptation); one reference swap."""
        self.thresholds = thresholds
        self.metrics.set_thresholds(thresholds.tolist())
        log.info("thresholds in force: %s", ", ".join(f"{t:.4f}" for t in thresholds))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """Serve `jobs` as one batch in the calling thread (no queue, no futures): the in-process path."""
        outcomes: dict[int, Outcome] = {}
        with torch.inference_mode():
            self._serve(jobs, lambda settled: outcomes.update((id(j), v) for j, v in settled))
        return [outcomes[id(j)] for j in jobs]

    # -- submission (event loop side) ------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future:
        """Enqueue `job` and return the future its answer will complete; raises QueueFull."""
        if self._stop.is_set():
            raise EngineStopped("the server is shutting down")
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull("the job queue is full") from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return job.future

    # -- worker side -------------------------------------------------------------------------
    def _take_batch(self, block: bool = True) -> list[Job]:
        try:
            first = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = until - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        return batch

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            idle_work = self.shadow.pending
            batch = [j for j in self._take_batch(block=not idle_work) if j.future is None or not j.future.done()]
            if not batch:
                if idle_work:
                    self._shadow_step()
                continue
            try:
                self._serve(batch, settle)
            except Exception as exc:  # one bad batch must not take the worker down
                log.exception("batch of %d failed", len(batch))
                failure = EngineFailure(f"inference failed: {type(exc).__name__}")
                settle([(j, failure) for j in batch if j.future is not None and not j.future.done()])

    def _shadow_step(self) -> None:
        try:
            with self._autocast():
                self.shadow.step()
        except Exception:  # a failing check must not take the worker down
            log.exception("shadow check failed")
            self.shadow.current = None

    def _to_device(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.to(memory_format=torch.channels_last) if self.cuda else x

    def _admit(self, batch: list[Job], deliver: Deliver) -> list[Job]:
        """Answer 504 to jobs that cannot make their deadline; return the rest."""
        now = time.monotonic()
        first = self.times.predict(0, len(batch))
        deadlines = np.array([NO_DEADLINE if j.deadline is None else j.deadline for j in batch])
        ok = reachable(now, deadlines, first)
        if ok.all():
            return batch
        rejected: list[tuple[Job, Outcome]] = []
        for job, fits, deadline in zip(batch, ok.tolist(), deadlines.tolist(), strict=True):
            if not fits:
                reason = (
                    "the deadline passed while the request was queued"
                    if now >= deadline
                    else f"exit 1 needs about {first * 1e3:.1f} ms; the deadline is sooner"
                )
                rejected.append((job, DeadlineUnreachable(reason)))
        deliver(rejected)
        return [j for j, fits in zip(batch, ok.tolist(), strict=True) if fits]

    def _serve(self, batch: list[Job], deliver: Deliver) -> None:
        batch = self._admit(batch, deliver)
        if not batch:
            return
        self.metrics.batch_size.observe(len(batch))
        started = time.monotonic()
        # Per-job options as arrays, or None when no job of the batch has one (the common case:
        # on tiny batches each NumPy call costs more than the decision itself).
        override = _column([j.threshold for j in batch], math.nan)
        max_exit = _column([j.max_exit for j in batch], NO_MAX_EXIT)
        deadline = _column([j.deadline for j in batch], NO_DEADLINE)
        x = self._to_device(torch.stack([j.x for j in batch]))
        rows = np.arange(len(batch))  # which job each remaining row of `h` belongs to
        h = x
        with torch.inference_mode(), self._autocast():
            for k in range(self.num_exits):
                t0 = time.monotonic()
                h = self.model.run_stage(k, h)
                logits, _ = self.model.run_exit(k, h)
                p = probabilities(logits, self.temperatures[k])  # the one softmax of this exit
                conf = confidence_of(p, self.measure).cpu().numpy()  # the only per-stage copy
                now = time.monotonic()
                self.times.observe(k, len(rows), now - t0)
                self._stage_hist[k].observe(now - t0)
                thr: float | np.ndarray = self.thresholds[k]
                if override is not None:
                    thr = np.where(np.isnan(override[rows]), thr, override[rows])
                codes = decide(
                    k, self.num_exits, conf, thr, max_exit=None if max_exit is None else max_exit[rows],
                    deadline=None if deadline is None else deadline[rows], now=now,
                    next_stage_s=0.0 if deadline is None else self.times.predict(k + 1, len(rows)),
                )  # fmt: skip
                stop = codes != GO_ON
                if stop.any():
                    deliver(self._answers(batch, rows, stop, codes, p, conf, k, now, started))
                if stop.all():
                    break
                keep = np.flatnonzero(~stop)
                h = h.index_select(0, torch.from_numpy(keep).to(h.device))
                rows = rows[keep]

    def _answers(
        self, batch: list[Job], rows: np.ndarray, stop: np.ndarray, codes: np.ndarray, p: Tensor,
        conf: np.ndarray, k: int, now: float, started: float,
    ) -> list[tuple[Job, Outcome]]:  # fmt: skip
        """The answers of the jobs whose rows stop at exit k, with their top-k classes."""
        idx = np.flatnonzero(stop)
        jobs = [batch[r] for r in rows[idx].tolist()]
        width = min(max(j.top_k for j in jobs), p.shape[1])
        stopping = p if len(idx) == len(p) else p.index_select(0, torch.from_numpy(idx).to(p.device))
        top_p, top_i = stopping.topk(width, dim=1)
        top_p, top_i = top_p.cpu().tolist(), top_i.cpu().tolist()
        full = stopping.cpu().tolist() if any(j.probabilities for j in jobs) else None
        settled: list[tuple[Job, Outcome]] = []
        for j, job in enumerate(jobs):
            n = min(job.top_k, width)
            pairs = list(zip(top_i[j][:n], top_p[j][:n], strict=True))
            reason: Reason = REASONS[int(codes[idx[j]])]  # type: ignore[assignment]
            probabilities = full[j] if full is not None and job.probabilities else None
            queued = started - job.enqueued
            answer = Answer(pairs[0][0], float(conf[idx[j]]), k + 1, reason, pairs, queued, now - started)
            answer.probabilities = probabilities
            settled.append((job, answer))
            if codes[idx[j]] == CONFIDENCE and job.threshold is None:  # at the thresholds in force
                self.shadow.offer(job.x, k, answer.index)
        return settled

    def _run_all_stages(self, x: Tensor) -> None:
        with torch.inference_mode(), self._autocast():
            h = x.to(self.device)
            if self.cuda:
                h = h.to(memory_format=torch.channels_last)
            for k in range(self.num_exits):
                h = self.model.run_stage(k, h)
                self.model.run_exit(k, h)
            if self.cuda:
                torch.cuda.synchronize(self.device)

    def _autocast(self):  # type: ignore[no-untyped-def]
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()
