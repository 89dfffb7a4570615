"""The anytime engine: stage queues (scheduler.py), a stage runner (runner.py), and the worker thread between.

The event loop submits a job (admission: refused at once when it cannot make its deadline) and
awaits its future. The worker thread asks the scheduler for the next batch, runs one stage and
its exit for it, applies the exit rule (`models/exit_policy.py`) to every row at once, answers
the rows that stop with one call into the event loop, and queues the rest for the next stage,
where they merge with rows of other batches. When nothing is queued it runs shadow checks for
the drift guard.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from models.artifact import Artifact
from models.exit_policy import CONFIDENCE, DEADLINE, GO_ON, MAX_EXIT, NO_MAX_EXIT, decide, reason
from service.engine.brownout import Brownout, floor_exit
from service.engine.drift import DriftGuard
from service.engine.jobs import (
    Answer,
    DeadlineUnreachable,
    Deliver,
    EngineFailure,
    EngineStopped,
    Job,
    Outcome,
    Passed,
    QueueFull,
    Sink,
    settle,
)
from service.engine.runner import CudaGraphRunner, EagerRunner, StageOutput, default_buckets
from service.engine.scheduler import Batch, Chunk, Scheduler
from service.engine.shadow import ShadowChecks
from service.engine.timing import StageTimes
from service.metrics import ModelMetrics
from service.options import InferenceOptions

log = logging.getLogger("anytime.engine")


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
    worker_nice: int = 0  # CPU: the worker thread's nice value (it shares the cores with the event loop)


@dataclass
class _Rows:
    """The per-row arrays of a batch (NaN threshold: the exit's own; NO_MAX_EXIT: none)."""

    jobs: list[Job]
    h: Tensor
    deadlines: np.ndarray
    priorities: np.ndarray
    override: np.ndarray | None
    max_exit: np.ndarray | None


def _column(values: list[float | int | None], missing: float) -> np.ndarray | None:
    """`values` as an array with `missing` for None, or None when every value is None (the common
    case: on small batches each NumPy call costs more than the decision itself)."""
    if all(v is None for v in values):
        return None
    return np.array([missing if v is None else v for v in values], dtype=np.float64)


class Engine:
    """Runs an artifact's network stage by stage for the rows of every queued job."""

    deadline_grace_s = 0.0  # the event loop answers at the deadline itself (`answer_now`)

    def __init__(
        self, artifact: Artifact, device: torch.device, metrics: ModelMetrics, config: EngineConfig | None = None
    ) -> None:
        config = config or EngineConfig()
        manifest = artifact.manifest
        self.config = config
        self.input = manifest.input
        self.device = device
        self.metrics = metrics
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
        )
        floor = floor_exit([e.val_accuracy for e in manifest.exits], config.brownout_floor_pp)
        self.brownout = Brownout(self.num_exits, floor, config.overload == "degrade")
        self._stage_hist = [metrics.stage(k) for k in range(self.num_exits)]
        self._stage_rows = [metrics.stage_rows(k) for k in range(self.num_exits)]
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
        self._stop = threading.Event()
        self._stopping = False
        self._busy = False  # a batch is running
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> None:
        """Capture CUDA graphs, warm up (so the first request pays no one-off costs) and start the worker."""
        shape = (self.input.channels, self.input.size, self.input.size)
        if isinstance(self.runner, CudaGraphRunner):
            self.runner.capture(shape)
        if warmup:
            self.warmup()
        self._thread = threading.Thread(target=self._work, name=f"anytime-worker-{self.device}", daemon=True)
        self._thread.start()

    def warmup(self, rounds: int = 3) -> None:
        """Run every stage at batch 1 and at the largest batch, then measure each stage's time there,
        so that deadline predictions start from this machine's figures."""
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
            self._stopping = True  # no new work from here on
        while time.monotonic() < end:
            with self._cond:
                if self.scheduler.queued == 0 and not self._busy:
                    break
            time.sleep(0.005)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, end - time.monotonic()) + 5)
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

    # -- submission (event loop side) ------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future:
        """Admit `job` and return the future its answer will complete.

        Raises QueueFull (503) when the queues are full or exit 1 is predicted too late for the
        deadline, DeadlineUnreachable (504) when the deadline has passed, EngineStopped (503)."""
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        self._admit(job)
        return job.future

    def submit_to(self, job: Job, sink: Sink) -> None:
        """Admit `job`, whose answer goes to `sink` rather than a future (another process's job); raises
        like `submit`."""
        job.sink = sink
        self._admit(job)

    def precheck(self, options: InferenceOptions) -> None:
        """Refuse now what admission would refuse, before the caller spends time decoding the input: the
        cheapest refusal under overload. Raises like `submit`; admits nothing. While a brownout can still
        go a level lower, it refuses only what would be late even then (the deeper queues cut), after
        stepping the brownout down as admission would."""
        now = time.monotonic()
        with self._cond:
            self._refuse_at_once(options, now)
            s = self.scheduler
            if not options.client_deadline:
                return
            brownout = self.brownout
            can_degrade = brownout.enabled and brownout.max_exit > brownout.floor
            eta = s.exit1_eta(s.priority(options), now, deep=not can_degrade)
            if eta > options.deadline:
                if can_degrade and brownout.refused(now):
                    self._brownout_changed()
                raise self._late_for_exit_1(eta, options.deadline, now)

    def _admit(self, job: Job) -> None:
        now = time.monotonic()
        with self._cond:
            self._refuse_at_once(job.options, now)
            s = self.scheduler
            job.max_exit = job.options.max_exit
            if self.brownout.enabled and self.brownout.level:
                job.max_exit = min(job.max_exit or self.num_exits, self.brownout.max_exit)
            priority = s.priority(job.options)
            wait, eta = s.exit1_forecast(priority, now)
            if job.options.client_deadline:
                if self.brownout.observe(eta - now, job.deadline - now, now):
                    self._brownout_changed()
                if eta > job.deadline and self.brownout.refused(now):
                    self._brownout_changed()
                    wait, eta = s.exit1_forecast(priority, now)  # the brownout cut the deeper queues
            if eta > job.deadline:
                raise self._late_for_exit_1(eta, job.deadline, now)
            s.add(job, now, wait)
            self.metrics.queue_depth.set(s.queued)
            self._cond.notify()

    def _refuse_at_once(self, options: InferenceOptions, now: float) -> None:
        """Under the lock: the refusals no queue or brownout can change: the engine stopping or full, a
        deadline already passed, or one exit 1 cannot meet even with nothing queued."""
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        if self.scheduler.queued >= self.config.queue_size:
            raise QueueFull("the server is at capacity; retry shortly", retry_after_s=self.scheduler.backlog_s(now))
        if options.deadline <= now:
            raise self._unreached("the deadline passed before the engine", options)
        if now + self.scheduler.cost(0, 1) > options.deadline:
            raise self._unreached("exit 1 cannot be reached in time", options)

    def _late_for_exit_1(self, eta: float, deadline: float, now: float) -> QueueFull:
        """Under the lock: the 503 of a request the queue ahead would make miss exit 1."""
        return QueueFull(
            f"exit 1 is predicted {(eta - now) * 1e3:.1f} ms from now (the queue ahead of this request); "
            f"the deadline is in {(deadline - now) * 1e3:.1f} ms",
            retry_after_s=self.scheduler.backlog_s(now),
        )

    def _brownout_changed(self) -> None:
        """Under the lock: publish the new limit and answer rows queued beyond it from the exit they passed."""
        limit = self.brownout.max_exit
        self.metrics.set_brownout(self.brownout.level, limit)
        log.warning("brownout level %d: new work answers by exit %d at the latest", self.brownout.level, limit)
        cut: list[Chunk] = []
        for k in range(limit, self.num_exits):  # stage index k feeds exit k + 1 > limit
            cut += self.scheduler.waiting[k]
            self.scheduler.waiting[k] = []
            self.scheduler.rows[k] = 0
        if cut:
            now = time.monotonic()
            settle([pair for c in cut for pair in self._answer_passed(c, MAX_EXIT, now)])

    def answer_now(self, job: Job) -> Answer:
        """The answer at the job's deadline, from the last exit it passed (reason `deadline`); called by
        the event loop when the worker has not answered in time. Raises DeadlineUnreachable if no exit
        was reached."""
        passed = job.passed
        if passed is None:
            raise self._unreached("no exit was reached by the deadline", job.options, job.started)
        now = time.monotonic()
        p = passed.p[passed.row : passed.row + 1]
        return self._answer_rows([job], p, np.array([passed.confidence]), np.array([DEADLINE]), passed.exit, now)[0][1]

    def _unreached(self, what: str, options: InferenceOptions, started: float | None = None) -> DeadlineUnreachable:
        """A 504 whose sentence says where the budget went (until the first stage `started`, if one did) and
        what exit 1 needs."""
        now = time.monotonic()
        received = options.received
        before = ((started or now) - received) * 1e3
        need = self.scheduler.cost(0, 1) * 1e3
        where = "before its first stage" if started else "before the engine ran it"
        return DeadlineUnreachable(
            f"{what}: of the {options.budget_ms:.1f} ms budget, {before:.1f} ms went {where} "
            f"({(now - received) * 1e3:.1f} ms in all); exit 1 needs about {need:.1f} ms"
        )

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """Serve `jobs` in the calling thread through the same scheduler and runner (no queue thread, no
        futures): the in-process path of the benchmarks."""
        outcomes: dict[int, Outcome] = {}

        def deliver(settled: list[tuple[Job, Outcome]]) -> None:
            outcomes.update((id(j), v) for j, v in settled)

        with self._cond:
            for job in jobs:
                job.max_exit = job.options.max_exit
                self.scheduler.add(job)
        while len(outcomes) < len(jobs):
            if not self._step(deliver):
                break
        return [outcomes.get(id(j), EngineStopped("not answered")) for j in jobs]

    # -- worker side -------------------------------------------------------------------------
    def _work(self) -> None:
        torch.set_grad_enabled(False)
        if self.device.type == "cpu" and self.config.worker_nice:
            # The event loop parses, decodes, admits and answers; when both want one core, it goes first,
            # so answers and refusals are not held behind a stage (docs/server.md, "Deadlines").
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.worker_nice)
        while not self._stop.is_set():
            try:
                if self._step(settle):
                    continue
                if self.shadow.pending:
                    self._shadow_step()
                    continue
                with self._cond:
                    if self.scheduler.queued == 0 and not self._stop.is_set():
                        if self.brownout.enabled and self.brownout.observe(0.0, 1.0, time.monotonic()):
                            self._brownout_changed()
                        self._cond.wait(timeout=0.05)
            except Exception:  # the worker must outlive any bug in one step
                log.exception("engine step failed")

    def _step(self, deliver: Deliver) -> bool:
        """Plan and run one stage for one batch; False when there was nothing to do."""
        with self._cond:
            now, cpu = time.monotonic(), time.thread_time()
            plan = self.scheduler.plan(now)
            batch = plan.batch
            if batch is not None:
                self._busy = True
                run_s = self.times.predict(batch.stage, self.runner.bucket(len(batch.jobs)))
                self.scheduler.busy_until = now + run_s
            self.metrics.queue_depth.set(self.scheduler.queued)
        planned = time.thread_time() - cpu  # the worker's own CPU time before the run
        if plan.unreachable:
            late = "exit 1 cannot be reached by the deadline"
            deliver([(j, self._unreached(late, j.options, j.started)) for j in plan.unreachable])
        for chunk in plan.late:
            deliver(self._answer_passed(chunk, DEADLINE, now))
        if batch is None:
            return bool(plan.unreachable or plan.late) or self._waiting_to_fill()
        own_s = None
        try:
            own_s = planned + self._run(batch, deliver)
        except Exception as exc:  # one bad batch must not take the worker down
            log.exception("stage %d of a batch of %d failed", batch.stage + 1, len(batch.jobs))
            failure = EngineFailure(f"inference failed: {type(exc).__name__}")
            deliver([(j, failure) for j in batch.jobs if not j.settled])
        finally:
            with self._cond:
                self._busy = False
                self.scheduler.busy_until = 0.0
                if own_s is not None:
                    self.scheduler.observe_overhead(own_s)
                    if batch.stage == 0:
                        self.scheduler.waited(batch.jobs, time.monotonic())
        return True

    def _waiting_to_fill(self) -> bool:
        if self.scheduler.rows[0] and self.config.max_wait_ms > 0:
            time.sleep(min(self.config.max_wait_ms / 1e3, 0.001))
            return True
        return False

    def _rows(self, batch: Batch) -> _Rows:
        if batch.stage == 0:
            jobs = batch.jobs
            started = time.monotonic()
            for j in jobs:
                j.started = started
            return _Rows(
                jobs,
                self.runner.load([j.x for j in jobs]),
                np.array([j.deadline for j in jobs]),
                np.array([j.priority for j in jobs]),
                _column([j.options.threshold for j in jobs], math.nan),
                _column([j.max_exit for j in jobs], NO_MAX_EXIT),
            )
        chunks = batch.chunks
        h = chunks[0].h if len(chunks) == 1 else torch.cat([c.h for c in chunks])
        jobs = [j for c in chunks for j in c.jobs]
        return _Rows(
            jobs,
            h,
            np.concatenate([c.deadlines for c in chunks]),
            np.concatenate([c.priorities for c in chunks]),
            _column([j.options.threshold for j in jobs], math.nan),
            _column([j.max_exit for j in jobs], NO_MAX_EXIT),
        )

    def _run(self, batch: Batch, deliver: Deliver) -> float:
        """Run the batch's stage and settle its rows; returns the CPU seconds spent around the stage
        itself (gathering rows, deciding, answering, queueing the rest): CPU time, because the thread
        may be descheduled at any moment and that is no cost of its own."""
        k = batch.stage
        begin = time.thread_time()
        rows = self._rows(batch)
        n = len(rows.jobs)
        t0, cpu0 = time.monotonic(), time.thread_time()
        out = self.runner.run(k, rows.h)
        now, cpu1 = time.monotonic(), time.thread_time()
        self.times.observe(k, self.runner.bucket(n), now - t0)
        self._stage_hist[k].observe(now - t0)
        self._stage_rows[k].observe(n)
        if k == 0:
            self.metrics.batch_size.observe(n)
        thr: float | np.ndarray = self.thresholds[k]
        if rows.override is not None:
            thr = np.where(np.isnan(rows.override), thr, rows.override)
        codes = decide(
            k,
            self.num_exits,
            out.conf,
            thr,
            max_exit=rows.max_exit,
            deadline=rows.deadlines,
            now=now,
            next_stage_s=self.times.predict(k + 1, self.runner.bucket(1)),
        )
        stop = codes != GO_ON
        if stop.any():
            deliver(self._answer_stopping(rows, out, stop, codes, k, now))
        if not stop.all():
            self._go_on(rows, out, ~stop, k)
        return (cpu0 - begin) + (time.thread_time() - cpu1)

    def _answer_stopping(
        self, rows: _Rows, out: StageOutput, stop: np.ndarray, codes: np.ndarray, k: int, now: float
    ) -> list[tuple[Job, Answer]]:
        idx = np.flatnonzero(stop)
        p = out.p if len(idx) == len(out.p) else out.p.index_select(0, torch.from_numpy(idx).to(out.p.device))
        jobs = [rows.jobs[i] for i in idx.tolist()]
        settled = self._answer_rows(jobs, p, out.conf[idx], codes[idx], k, now)
        for (job, answer), code in zip(settled, codes[idx].tolist(), strict=True):
            if code == CONFIDENCE and job.shadow and job.options.threshold is None:  # at the thresholds in force
                self.shadow.offer(job.x, k, answer.index)
        return settled

    def _go_on(self, rows: _Rows, out: StageOutput, keep: np.ndarray, k: int) -> None:
        """Rows that go on join stage k+1's queue, remembering exit k for an answer at their deadline."""
        idx = np.flatnonzero(keep)
        live = [i for i in idx.tolist() if not rows.jobs[i].settled]
        if not live:
            return
        idx = np.array(live, dtype=np.int64)
        assert out.h is not None
        if len(idx) == len(rows.jobs):
            h, p = out.h, out.p
        else:
            t = torch.from_numpy(idx).to(out.h.device)
            h, p = out.h.index_select(0, t), out.p.index_select(0, t)
        jobs = [rows.jobs[i] for i in live]
        conf = out.conf[idx]
        for r, job in enumerate(jobs):
            job.passed = Passed(p, r, k, float(conf[r]))
        chunk = Chunk(k + 1, jobs, h, p, conf, rows.deadlines[idx], rows.priorities[idx])
        with self._cond:
            if self.brownout.enabled and k + 1 >= self.brownout.max_exit:
                late = chunk  # the brownout lowered the limit while these rows ran
            else:
                self.scheduler.put(chunk)
                return
        settle(list(self._answer_passed(late, MAX_EXIT, time.monotonic())))

    def _answer_passed(self, chunk: Chunk, code: int, now: float) -> list[tuple[Job, Answer]]:
        """Answer a chunk's rows from the exit they passed (stage - 1)."""
        live = [i for i, j in enumerate(chunk.jobs) if not j.settled]
        if not live:
            return []
        idx = np.array(live, dtype=np.int64)
        p = chunk.p if len(live) == len(chunk) else chunk.p.index_select(0, torch.from_numpy(idx).to(chunk.p.device))
        jobs = [chunk.jobs[i] for i in live]
        return self._answer_rows(jobs, p, chunk.conf[idx], np.full(len(live), code), chunk.stage - 1, now)

    def _answer_rows(
        self, jobs: list[Job], p: Tensor, conf: np.ndarray, codes: np.ndarray, k: int, now: float
    ) -> list[tuple[Job, Answer]]:
        """Answers of `jobs` at 0-based exit `k` from their probabilities `p`, with their top-k classes."""
        width = min(max(j.options.top_k for j in jobs), p.shape[1])
        top_p, top_i = p.topk(width, dim=1)
        top_p, top_i = top_p.cpu().tolist(), top_i.cpu().tolist()
        full = p.cpu().tolist() if any(j.options.probabilities for j in jobs) else None
        settled: list[tuple[Job, Answer]] = []
        for r, job in enumerate(jobs):
            n = min(job.options.top_k, width)
            pairs = list(zip(top_i[r][:n], top_p[r][:n], strict=True))
            started = job.started if job.started is not None else now
            probabilities = full[r] if full is not None and job.options.probabilities else None
            queue_s, compute_s = started - job.options.received, now - started
            answer = Answer(pairs[0][0], float(conf[r]), k + 1, reason(int(codes[r])), pairs, queue_s, compute_s)
            answer.probabilities = probabilities
            settled.append((job, answer))
        return settled

    def _shadow_step(self) -> None:
        try:
            with self.runner.autocast():
                self.shadow.step()
        except Exception:  # a failing check must not take the worker down
            log.exception("shadow check failed")
            self.shadow.current = None
