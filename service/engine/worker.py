"""The worker loop: asks the scheduler for the next batch, runs one stage and its exit for it, applies
the exit rule (`models/exit_policy.py`) to every row at once, settles the rows that stop (one call
per sink), and queues the rest for the next stage, where they merge with rows of other batches.
When nothing is queued it runs shadow checks for the drift guard, and on a CPU, while requests come
in, keeps stage 1 warm (`Worker.keep_warm`).

Runs on the engine's worker thread (in the server's process, or in the engine process of several
request processes); `Worker.step` also runs in the caller's thread for `Engine.run` (benchmarks).
Every touch of the scheduler is under the engine's lock.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.exit_policy import CONFIDENCE, DEADLINE, GO_ON, MAX_EXIT, NO_MAX_EXIT, decide
from service.engine.admission import Admission, unreached
from service.engine.answers import answer_chunk, answer_rows, prepare_fallbacks
from service.engine.brownout import Brownout
from service.engine.jobs import Answer, Deliver, EngineFailure, Job, Passed, announce_passed, settle
from service.engine.priority import Baton
from service.engine.runner import EagerRunner, StageOutput
from service.engine.scheduler import Batch, Chunk, Scheduler
from service.engine.shadow import ShadowChecks
from service.engine.timing import StageTimes
from service.metrics import ModelMetrics

log = logging.getLogger("anytime.engine")
IDLE_WAIT_S = 0.05  # an idle worker wakes this often to run shadow checks and let the brownout recover
KEEP_WARM_FOR_S = 30.0  # stage 1 is kept warm this long after the last request's run; then the worker idles
KEEP_WARM_SHARE = 0.1  # the keep-warm runs take at most this share of the worker's time (its period stretches)
FILL_SLEEP_S = 0.001  # waiting to fill a batch (ANYTIME_MAX_WAIT_MS), the worker polls this often


@dataclass
class _Rows:
    """The per-row arrays of a batch (NaN threshold: the exit's own; NO_MAX_EXIT: none)."""

    jobs: list[Job]
    h: Tensor
    plan_by: np.ndarray  # each row's `Job.plan_by`: its next exit is wasted after it
    priorities: np.ndarray
    override: np.ndarray | None
    max_exit: np.ndarray | None


def _column(values: list[float | int | None], missing: float) -> np.ndarray | None:
    """`values` as an array with `missing` for None, or None when every value is None (the common
    case: on small batches each NumPy call costs more than the decision itself)."""
    if all(v is None for v in values):
        return None
    return np.array([missing if v is None else v for v in values], dtype=np.float64)


class Worker:
    """Runs stages for the scheduler's batches and settles their rows."""

    def __init__(
        self,
        runner: EagerRunner,
        scheduler: Scheduler,
        admission: Admission,
        times: StageTimes,
        shadow: ShadowChecks,
        metrics: ModelMetrics,
        lock: threading.Condition,
        thresholds: Callable[[], np.ndarray],
        max_wait_s: float,
    ) -> None:
        self.runner, self.scheduler, self.admission = runner, scheduler, admission
        self.times, self.shadow, self.metrics = times, shadow, metrics
        self.brownout: Brownout = admission.brownout
        self.num_exits = scheduler.num_stages
        self._cond = lock
        self._thresholds = thresholds
        self.max_wait_s = max_wait_s
        self.busy = False  # a batch is running
        self.stop = threading.Event()
        self.on_step: Callable[[], None] | None = None  # after each planned step, under the lock (forecasts)
        self.baton: Baton | None = None  # two threads, yielding and fair: which one steps (priority.py)
        self._stage_hist = [metrics.stage(k) for k in range(self.num_exits)]
        self._stage_rows = [metrics.stage_rows(k) for k in range(self.num_exits)]
        self._warm: tuple[float, Tensor] | None = None  # (period, stage 1's blank input): `keep_warm`
        self._ran_at = self._served_at = -math.inf  # the last run of any kind; of a request's stage
        self._calm_at = -math.inf  # when the admission last heard the worker idle

    def loop(self, nice: int) -> None:
        """The worker thread's body, until `stop` is set."""
        torch.set_grad_enabled(False)
        if nice:  # relative to the thread that started it: lowering a priority needs no privilege, raising one does
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        yielding = nice > 0
        while not self.stop.is_set():
            if self.baton is not None and not self.baton.turn(yielding):
                continue
            try:
                if self.step(settle):
                    continue
                if self.shadow.pending:
                    self._shadow_step()
                    continue
                self._idle()
            except Exception:  # the worker must outlive any bug in one step
                log.exception("engine step failed")

    def keep_warm(self, period_s: float, blank: Tensor) -> None:
        """While requests come in (up to `KEEP_WARM_FOR_S` after the last one's run), run stage 1 on
        `blank` (stage 1's input for one blank sample) whenever the worker has idled `period_s`.

        On a VM, a core that idles between requests loses the model's code and weights from its
        caches to whatever else the host runs there: the next request's stage 1 ran 2-3x slower than
        back to back (docs/server.md, "Deadlines"). A busy loop in its place does not help; running
        the stage itself does. Invisible to admission, like a shadow check: a request arriving during
        the run waits for it (one warm stage 1 at batch 1).

        The period stretches to ten times stage 1's estimate at batch 1 (`KEEP_WARM_SHARE`): a network
        whose stage 1 takes longer than a tenth of the period (a pretrained ResNet-50 at 224x224 takes
        tens of milliseconds on a CPU) would otherwise keep the core busy for nothing but warmth. The
        estimate, not the keep-warm run's own time: one run preempted by a neighbour would stretch the
        period for nothing."""
        self._warm = (period_s, blank)

    def _idle(self) -> None:
        """Nothing to do: wait for work (up to `IDLE_WAIT_S`), or keep stage 1 warm when that is due."""
        with self._cond:
            if self.scheduler.queued or self.stop.is_set():
                return
            now = time.monotonic()
            # Each call is a calm moment that lowers the brownout's pressure: after a request's step,
            # else once per IDLE_WAIT_S, as without the keep-warm (its wake-ups are no extra ones).
            if self._served_at > self._calm_at or now - self._calm_at >= IDLE_WAIT_S:
                self._calm_at = now
                self.admission.idle(now)
            due = self._warm_due(now)
            if due is None or due > now:
                self._cond.wait(timeout=IDLE_WAIT_S if due is None else min(IDLE_WAIT_S, due - now))
                return
        self._warm_step()

    def _warm_due(self, now: float) -> float | None:
        """When the next keep-warm run is due (None: off, or no request lately)."""
        if self._warm is None or now - self._served_at > KEEP_WARM_FOR_S:
            return None
        stage_1 = self.times.predict(0, self.runner.bucket(1))
        return self._ran_at + max(self._warm[0], stage_1 / KEEP_WARM_SHARE)

    def _warm_step(self) -> None:
        assert self._warm is not None
        try:
            self.runner.run(0, self._warm[1])
        except Exception:  # logged once: a failing run every period would flood the log
            log.exception("keeping stage 1 warm failed; stopped")
            self._warm = None
        finally:
            self._ran_at = time.monotonic()

    def step(self, deliver: Deliver) -> bool:
        """Plan and run one stage for one batch; False when there was nothing to do."""
        with self._cond:
            now, cpu = time.monotonic(), time.thread_time()
            plan = self.scheduler.plan(now)
            batch = plan.batch
            if batch is not None:
                self.busy = True
                run_s = self.times.predict(batch.stage, self.runner.bucket(len(batch.jobs)))
                self.scheduler.busy_until = now + run_s
            self.metrics.queue_depth.set(self.scheduler.queued)
            if self.on_step is not None:
                self.on_step()
        planned = time.thread_time() - cpu  # the worker's own CPU time before the run
        if plan.unreachable:
            exit1_s = self.scheduler.cost(0, 1)
            late = "exit 1 cannot be reached by the deadline"
            deliver([(j, unreached(late, j.options, exit1_s, j.started)) for j in plan.unreachable])
        for chunk in plan.late:
            deliver(answer_chunk(chunk, DEADLINE, now))
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
            self._ran_at = self._served_at = time.monotonic()
            with self._cond:
                self.busy = False
                self.scheduler.busy_until = 0.0
                if own_s is not None:
                    self.scheduler.observe_overhead(own_s)
                if batch.stage == 0:  # a failed run's jobs left the queue too, without passing exit 1
                    self.scheduler.waited(batch.jobs, time.monotonic(), ran=own_s is not None)
        return True

    def _waiting_to_fill(self) -> bool:
        if self.scheduler.waiting_rows(0) and self.max_wait_s > 0:
            time.sleep(min(self.max_wait_s, FILL_SLEEP_S))
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
                np.array([j.plan_by for j in jobs]),
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
            np.concatenate([c.plan_by for c in chunks]),
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
        self.metrics.stage_run(n, now - t0)
        if k == 0 and any(j.shadow for j in rows.jobs):  # a batch of warm-up traffic alone is no execution
            self.metrics.batch_size.observe(n)
        thr: float | np.ndarray = self._thresholds()[k]
        if rows.override is not None:
            thr = np.where(np.isnan(rows.override), thr, rows.override)
        codes = decide(
            k,
            self.num_exits,
            out.conf,
            thr,
            max_exit=rows.max_exit,
            deadline=rows.plan_by,
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
        settled = list(zip(jobs, answer_rows(jobs, p, out.conf[idx], codes[idx], k, now), strict=True))
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
        prepare_fallbacks(jobs, p, conf, k, time.monotonic())
        for r, job in enumerate(jobs):
            job.passed = Passed(p, r, k, float(conf[r]))
        announce_passed(jobs)
        chunk = Chunk(k + 1, jobs, h, p, conf, rows.plan_by[idx], rows.priorities[idx])
        with self._cond:
            if self.brownout.enabled and k + 1 >= self.brownout.max_exit:
                late = chunk  # the brownout lowered the limit while these rows ran
            else:
                self.scheduler.put(chunk)
                return
        settle(answer_chunk(late, MAX_EXIT, time.monotonic()))

    def _shadow_step(self) -> None:
        try:
            with self.runner.autocast():
                self.shadow.step()
        except Exception:  # a failing check must not take the worker down
            log.exception("shadow check failed")
            self.shadow.current = None
        finally:
            self._ran_at = time.monotonic()
