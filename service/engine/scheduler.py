"""Stage-level scheduling: a queue per stage, earliest deadline first, merging, admission.

New jobs wait in stage 1's queue; rows that go on past exit k wait in stage k+1's queue as a
`Chunk` (their activations, and the probabilities of the exit they passed) and merge there with
the rows other batches sent on, so deep stages run full batches instead of remnants (E3's
constant batch size). Every row has a priority: its deadline, or, for a request without one,
its arrival plus `aging_s` (so it cannot starve); a request of a lower level than the highest
(Triton's `priority`: 1 the highest) counts as `priority_step_s` less urgent per level, so among
jobs about as urgent the higher level goes first (its deadline does not move: a lower level is
still refused, or answered from its exit, by its own deadline). `plan` picks what the worker runs next:

1. stage 1, when one more run of anything else would make one of its jobs miss exit 1 (each job
   finishes after the batches ahead of it in the queue): a job without an exit has no answer at
   all, so it goes before any deeper row;
2. else a deeper stage whose most urgent row would otherwise miss its next exit (earliest
   deadline first among them);
3. else the deepest stage with a full batch (a GPU stage costs about the same at any batch size);
4. else new work (stage 1);
5. else the deepest waiting stage (its rows are the oldest and nearest to an answer).

A row that passed an exit is never at risk of going unanswered (it is answered from that exit
at its deadline), so under overload deeper stages yield to first exits: accuracy degrades
before availability even in the default `shed` mode.

Before a run, rows that can no longer make their next stage by their deadline leave: answered
from the exit they passed (reason `deadline`), or, in stage 1's queue, refused (504). Admission
predicts when a new job would reach exit 1 from the work queued ahead of it and the measured
stage times, and refuses at once what cannot make it.

This module runs no model and starts no thread. It runs in the engine's process (the server's
own, or the engine process of several request processes), on the worker thread and on whichever
thread admits a job, always under the engine's lock (service/engine/engine.py).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from service.engine.jobs import Job
from service.engine.limit import InflightLimit
from service.engine.timing import Slowdown, StageTimes
from service.options import InferenceOptions

# The deadline heap keeps entries of jobs taken since (removed lazily); rebuilt past twice the queue plus this.
HEAP_SLACK = 64
# Stage 1's urgency looks this many full batches ahead: enough to cover a burst, few enough to stay cheap.
URGENCY_BATCHES = 8


def queue_priority(options: InferenceOptions, aging_s: float, step_s: float) -> float:
    """A request's place in the queues: its deadline, or its arrival plus the aging time if sooner, made
    `step_s` later per level below the highest."""
    return min(options.deadline, options.received + aging_s) + max(options.priority - 1, 0) * step_s


@dataclass(eq=False)
class Chunk:
    """Rows waiting for stage `stage`: their jobs, activations and what exit `stage - 1` gave them."""

    stage: int
    jobs: list[Job]
    h: Tensor
    p: Tensor
    conf: np.ndarray
    plan_by: np.ndarray  # each row's `Job.plan_by`: when it must pass its next exit
    priorities: np.ndarray

    def __len__(self) -> int:
        return len(self.jobs)

    def split(self, keep: np.ndarray) -> tuple[Chunk, Chunk | None]:
        """(rows where `keep`, the rest or None)."""
        if keep.all():
            return self, None
        return self._rows(np.flatnonzero(keep)), self._rows(np.flatnonzero(~keep))

    def _rows(self, idx: np.ndarray) -> Chunk:
        t = torch.from_numpy(idx).to(self.h.device)
        jobs = [self.jobs[i] for i in idx.tolist()]
        h, p = self.h.index_select(0, t), self.p.index_select(0, t)
        return Chunk(self.stage, jobs, h, p, self.conf[idx], self.plan_by[idx], self.priorities[idx])


@dataclass
class Forecast:
    """What the check before decoding needs of an engine's queues, as plain numbers (`Scheduler.forecast`;
    the engine process publishes it to its request processes). Absolute times are `time.monotonic()` seconds, which
    every process on the machine shares."""

    stopping: bool
    full: bool
    retry_after_s: float
    exit1_s: float  # stage 1 and its exit for one row
    busy_until: float  # predicted end of the run in progress
    deep_s: float  # one run of a deeper stage when rows wait there, else 0
    batch_cost_s: np.ndarray  # [n]: seconds to run n rows of stage 1 (n < max_batch), overhead included
    full_batch_s: float  # seconds of one full stage-1 batch, overhead included
    priorities: np.ndarray  # stage 1's queue, sorted
    aging_s: float  # a request's place in the queues is `queue_priority` with these two
    priority_step_s: float
    slowdown: Slowdown
    in_flight: int  # admitted jobs waiting for exit 1
    limit: float  # how many may (`InflightLimit`)

    def priority(self, options: InferenceOptions) -> float:
        """`Scheduler.priority` from these figures."""
        return queue_priority(options, self.aging_s, self.priority_step_s)

    def exit1_eta(self, priority: float, now: float) -> float:
        """`Scheduler.exit1_eta` from these figures."""
        ahead = int(np.searchsorted(self.priorities, priority, side="right")) + 1
        full, rest = divmod(ahead, len(self.batch_cost_s))
        wait = max(0.0, self.busy_until - now) + full * self.full_batch_s + float(self.batch_cost_s[rest]) + self.deep_s
        return now + self.slowdown.wait(wait, now)


@dataclass
class Batch:
    """What the worker runs next: stage `stage` for `jobs` (stage 1: their inputs; deeper: `chunks`)."""

    stage: int
    jobs: list[Job]
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class Plan:
    """One step of the worker: a batch to run (or None), and rows to answer first."""

    batch: Batch | None
    late: list[Chunk]  # rows answered now from the exit they passed (reason deadline)
    unreachable: list[Job]  # stage 1 rows that cannot reach exit 1 by their deadline (504)


class Scheduler:
    """The stage queues of one engine and the rules that pick, admit and expire."""

    def __init__(
        self,
        num_stages: int,
        max_batch: int,
        times: StageTimes,
        bucket: Callable[[int], int],
        aging_s: float,
        queue_size: int,
        max_wait_s: float = 0.0,
        priority_step_s: float = 0.0,
    ) -> None:
        self.num_stages = num_stages
        self.max_batch = max_batch
        self.times, self.bucket = times, bucket
        self.aging_s, self.queue_size, self.max_wait_s = aging_s, queue_size, max_wait_s
        self.priority_step_s = priority_step_s
        self._new: list[tuple[float, int, Job]] = []  # stage 1's queue, sorted by (priority, seq)
        self._by_deadline: list[tuple[float, int, Job]] = []  # the same jobs as a heap by deadline (lazy)
        self.waiting: list[list[Chunk]] = [[] for _ in range(num_stages)]  # index 0 unused
        self.busy_until = 0.0  # predicted end of the run in progress
        self.overhead_s = 0.0  # the worker's own time per run (planning, deciding, answering), smoothed
        self.slowdown = Slowdown()  # how much longer than predicted admitted jobs wait for exit 1
        self.limit = InflightLimit(queue_size)  # how many admitted jobs may wait for exit 1 at once
        self.in_flight = 0  # admitted jobs waiting for exit 1 (queued for stage 1, or in its run)

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def rows(self) -> list[int]:
        """Rows waiting in each stage's queue (derived from the queues, never kept by hand)."""
        return [len(self._new)] + [sum(len(c) for c in self.waiting[k]) for k in range(1, self.num_stages)]

    def waiting_rows(self, k: int) -> int:
        """Rows waiting in stage `k`'s queue."""
        return len(self._new) if k == 0 else sum(len(c) for c in self.waiting[k])

    @property
    def queued(self) -> int:
        """Rows waiting in every stage queue (not the ones running)."""
        return len(self._new) + sum(len(c) for k in range(1, self.num_stages) for c in self.waiting[k])

    def priority(self, options: InferenceOptions) -> float:
        """A request's place in the queues (`queue_priority`)."""
        return queue_priority(options, self.aging_s, self.priority_step_s)

    def cost(self, stage: int, rows: int) -> float:
        """Predicted seconds to run `rows` rows through stage `stage` in full batches."""
        if rows <= 0:
            return 0.0
        full, rest = divmod(rows, self.max_batch)
        t = full * self.times.predict(stage, self.bucket(self.max_batch))
        t += self.times.predict(stage, self.bucket(rest)) if rest else 0.0
        return t + (full + (rest > 0)) * self.overhead_s

    def observe_overhead(self, seconds: float) -> None:
        """One run's CPU time outside the stage itself (the worker's Python around it). One measurement
        counts as at most twice the estimate (a garbage collection in the worker is no new normal)."""
        seconds = max(0.0, seconds)
        if self.overhead_s > 0:
            seconds = min(seconds, 2 * self.overhead_s)
        self.overhead_s += 0.2 * (seconds - self.overhead_s)

    # -- admission ---------------------------------------------------------------------------
    def exit1_wait(self, priority: float, now: float, deep: bool = True) -> float:
        """How long a job of this priority, arriving now, would wait to pass exit 1 by the stage times:
        the run in progress, the new jobs that go before it (earliest priority first) and its own run,
        plus (if `deep`) one run of a deeper stage when rows wait there (stage 1 preempts them only
        between runs)."""
        ahead = bisect.bisect_right(self._new, (priority, math.inf))
        t = max(0.0, self.busy_until - now) + self.cost(0, ahead + 1)
        if deep:
            deeper = [self.waiting_rows(k) for k in range(1, self.num_stages)]
            t += max((self._run_s(k + 1, n) for k, n in enumerate(deeper) if n), default=0.0)
        return t

    def _run_s(self, k: int, rows: int) -> float:
        """Predicted seconds of one run of stage `k` for the first batch of `rows` waiting rows."""
        return self.times.predict(k, self.bucket(min(rows, self.max_batch)))

    def exit1_forecast(self, priority: float, now: float, deep: bool = True) -> tuple[float, float]:
        """(its wait by the stage times, `exit1_eta`) for such a job: admission queues it with the first
        and decides by the second.

        An idle engine (nothing queued, nothing running) predicts the job's own run alone, at the lower of
        its estimate and its warm-up figure, and no slowdown: estimates and the slowdown are learnt under
        load and only relearnt from runs, so once an overload inflated them an idle engine would refuse
        everything and never measure again (a livelock). It admits whatever exit 1 fits by its warm-up
        figure, and that job's run measures the machine afresh."""
        if self.idle():
            wait = self.exit1_alone()
            return wait, now + wait
        wait = self.exit1_wait(priority, now, deep)
        return wait, now + self.slowdown.wait(wait, now)

    def exit1_alone(self) -> float:
        """The least a job can take to pass exit 1: its own run on an idle engine, at the lower of the
        estimate and the warm-up figure (what no queue or slowdown can change)."""
        return min(self.cost(0, 1), self.times.baseline(0, self.bucket(1)) + self.overhead_s)

    def idle(self) -> bool:
        """Nothing queued in any stage and no run in progress."""
        return self.busy_until == 0.0 and not self._new and not any(self.waiting[1:])  # 0: no run in progress

    def exit1_eta(self, priority: float, now: float, deep: bool = True) -> float:
        """When such a job is predicted to have passed exit 1: its wait by the stage times, times the
        slowdown admitted jobs have seen lately (`Slowdown`)."""
        return self.exit1_forecast(priority, now, deep)[1]

    def forecast(self, now: float, deep: bool) -> Forecast:
        """The figures the check before decoding needs, as of `now` (`deep`: count a deeper stage's run)."""
        deeper = [self.waiting_rows(k) for k in range(1, self.num_stages)] if deep else []
        return Forecast(
            stopping=False,
            full=self.queued >= self.queue_size,
            retry_after_s=self.backlog_s(now),
            exit1_s=self.exit1_alone(),
            busy_until=self.busy_until,
            deep_s=max((self._run_s(k + 1, n) for k, n in enumerate(deeper) if n), default=0.0),
            batch_cost_s=np.array([self.cost(0, n) for n in range(self.max_batch)]),
            full_batch_s=self.cost(0, self.max_batch),
            priorities=np.array([p for p, _, _ in self._new]),
            aging_s=self.aging_s,
            priority_step_s=self.priority_step_s,
            slowdown=Slowdown.restored(self.slowdown.state),
            in_flight=self.in_flight,
            limit=self.limit.value,
        )

    def waited(self, jobs: Sequence[Job], now: float, ran: bool = False) -> None:
        """Admitted jobs that passed exit 1 (`ran`: stage 1 ran for them) or were dropped without it at `now`:
        their waits teach the slowdown, and when they passed exit 1 the in-flight limit (`InflightLimit`)."""
        measured = [j for j in jobs if j.admitted is not None]
        if not measured:
            return
        self.slowdown.observe([j.predicted_wait_s for j in measured], [now - j.admitted for j in measured], now)
        self.in_flight = max(0, self.in_flight - len(measured))
        for job in measured:
            if not ran or now > job.deadline:
                self.limit.lost(job.admitted, now)
            elif now <= job.plan_by:
                self.limit.passed()
            # else a near miss: exit 1 came after the answer was due, by the deadline; the limit holds

    def backlog_s(self, now: float) -> float:
        """Predicted seconds to run everything queued (for Retry-After)."""
        t = max(0.0, self.busy_until - now)
        return t + sum(self.cost(k, n) for k, n in enumerate(self.rows))

    def add(self, job: Job, now: float | None = None, wait_s: float = 0.0) -> None:
        """Queue a new job for stage 1, admitted at `now` (if given) with a predicted wait of `wait_s`
        (`exit1_wait`): its wait is measured against that."""
        job.admitted, job.predicted_wait_s = now, wait_s
        if now is not None:
            self.in_flight += 1
        job.priority = self.priority(job.options)
        job.queued = True
        bisect.insort(self._new, (job.priority, job.seq, job))
        heapq.heappush(self._by_deadline, (job.deadline, job.seq, job))
        if len(self._by_deadline) > 2 * len(self._new) + HEAP_SLACK:  # drop entries of jobs taken since
            self._by_deadline = [(j.deadline, seq, j) for _, seq, j in self._new]
            heapq.heapify(self._by_deadline)

    # -- the worker's step ---------------------------------------------------------------------
    def plan(self, now: float) -> Plan:
        """Pick and take the next batch, and the rows that must be answered (or refused) before it."""
        late: list[Chunk] = []
        unreachable = self._unreachable(now, 0.0)
        stage = self._pick(now)
        if stage is None or (stage == 0 and self._wait_to_fill(now)):
            self.waited(unreachable, now)
            return Plan(None, late, unreachable)
        batch = self._take(stage, now)
        run_s = self.times.predict(stage, self.bucket(len(batch.jobs)))
        # Rows past an exit that would finish after their `Job.plan_by` leave now, from the exit they passed;
        # new jobs, that would miss their deadline, leave unanswered. New jobs are judged by the lower of
        # the estimate and the warm-up figure, as admission judges them.
        if stage == 0:
            first_s = min(run_s, self.times.baseline(0, self.bucket(len(batch.jobs))))
            keep = [j for j in batch.jobs if now + first_s <= j.deadline]
            if len(keep) < len(batch.jobs):
                unreachable += [j for j in batch.jobs if now + first_s > j.deadline]
                batch.jobs = keep
        else:
            kept = []
            for chunk in batch.chunks:
                ok, gone = chunk.split(chunk.plan_by >= now + run_s)
                if gone is not None:
                    late.append(gone)
                if ok is not None and len(ok):
                    kept.append(ok)
            batch.chunks = kept
            batch.jobs = [j for c in kept for j in c.jobs]
        # Rows left waiting that cannot make their stage after this run leave now too.
        unreachable += self._unreachable(now, run_s)
        late += self._expire(now + run_s)
        self.waited(unreachable, now)
        return Plan(batch if batch.jobs else None, late, unreachable)

    def put(self, chunk: Chunk) -> None:
        """Rows that went on past an exit join the next stage's queue."""
        self.waiting[chunk.stage].append(chunk)

    def cut(self, first: int, spared: Callable[[Job], bool] | None = None) -> list[Chunk]:
        """Take every row waiting for stage `first` or deeper (a brownout lowered the deepest exit), but
        those of `spared` jobs."""
        cut: list[Chunk] = []
        for k in range(max(1, first), self.num_stages):
            if spared is None:
                cut += self.waiting[k]
                self.waiting[k] = []
                continue
            kept = []
            for chunk in self.waiting[k]:
                keep = np.array([spared(j) for j in chunk.jobs], dtype=bool)
                ok, gone = chunk.split(keep)
                if keep.any():
                    kept.append(ok)
                if gone is not None:
                    cut.append(gone)
            self.waiting[k] = kept
        return cut

    def drain(self) -> tuple[list[Job], list[Chunk]]:
        """Everything still queued (the engine is stopping)."""
        jobs = [j for _, _, j in self._new]
        chunks = [c for k in range(1, self.num_stages) for c in self.waiting[k]]
        self._new.clear()
        self._by_deadline.clear()
        self.waiting = [[] for _ in range(self.num_stages)]
        return jobs, chunks

    # -- rules ---------------------------------------------------------------------------------
    def _head(self, k: int) -> float:
        if k == 0:
            return self._new[0][0]
        return min(float(c.priorities.min()) for c in self.waiting[k])

    def window(self) -> float:
        """How long one run may delay anything else: the longest stage at a full batch."""
        return max(self.times.predict(k, self.bucket(self.max_batch)) for k in range(self.num_stages))

    def _slack(self, k: int, now: float) -> float:
        return self._head(k) - now - self._run_s(k, self.waiting_rows(k))

    def _new_slack(self, now: float, batches: int = URGENCY_BATCHES) -> float:
        """How long stage 1's queue can wait before one of its first `batches` batches, run back to back,
        ends past a job's deadline."""
        b = self.max_batch
        t = self.times.predict(0, self.bucket(b)) + self.overhead_s
        slack = math.inf
        for j in range(min(batches, -(-len(self._new) // b))):
            due = min(job.deadline for _, _, job in self._new[j * b : (j + 1) * b])
            slack = min(slack, due - now - (j + 1) * t)
        return slack

    def _pick(self, now: float) -> int | None:
        rows = self.rows
        stages = [k for k in range(self.num_stages) if rows[k]]
        if not stages:
            return None
        window = self.window()
        if rows[0] and self._new_slack(now) <= window:
            return 0
        deep = [k for k in stages if k > 0]
        if deep:
            urgent = min(deep, key=lambda k: (self._head(k), -k))
            if self._slack(urgent, now) <= window:
                return urgent
        for k in range(self.num_stages - 1, 0, -1):
            if rows[k] >= self.max_batch:
                return k
        if rows[0]:
            return 0
        return max(stages)

    def _wait_to_fill(self, now: float) -> bool:
        """Whether to wait for more new jobs before running stage 1 (ANYTIME_MAX_WAIT_MS)."""
        if self.max_wait_s <= 0 or len(self._new) >= self.max_batch:
            return False
        oldest = min(j.options.received for _, _, j in self._new)
        return now - oldest < self.max_wait_s

    def _take(self, k: int, now: float) -> Batch:
        if k == 0:
            taken = self._new[: self.max_batch]
            del self._new[: self.max_batch]
            # Jobs already answered (at their deadline, by the event loop) or whose client left are not run.
            live: list[Job] = []
            answered: list[Job] = []
            for _, _, job in taken:
                job.queued = False
                (answered if job.settled else live).append(job)
            self.waited(answered, now)
            return Batch(0, live)
        chunks = sorted(self.waiting[k], key=lambda c: float(c.priorities.min()))
        need, chosen, left = self.max_batch, [], []
        for chunk in chunks:
            if need == 0:
                left.append(chunk)
            elif len(chunk) <= need:
                chosen.append(chunk)
                need -= len(chunk)
            else:
                keep = np.zeros(len(chunk), dtype=bool)
                keep[np.argsort(chunk.priorities, kind="stable")[:need]] = True
                now_part, later = chunk.split(keep)
                chosen.append(now_part)
                assert later is not None
                left.append(later)
                need = 0
        self.waiting[k] = left
        return Batch(k, [j for c in chosen for j in c.jobs], chosen)

    def _unreachable(self, now: float, after_s: float) -> list[Job]:
        """Stage 1 jobs that cannot pass exit 1 by their deadline if their stage starts `after_s` from
        now; they leave the queue (the worker answers them 504)."""
        limit = now + after_s + min(self.times.predict(0, self.bucket(1)), self.times.baseline(0, self.bucket(1)))
        out: list[Job] = []
        answered: list[Job] = []  # by the event loop at their deadline, before a stage ran them
        while self._by_deadline and self._by_deadline[0][0] < limit:
            _, seq, job = heapq.heappop(self._by_deadline)
            if not job.queued:
                continue  # taken into a batch since
            i = bisect.bisect_left(self._new, (job.priority, seq))
            del self._new[i]
            job.queued = False
            if job.settled:
                answered.append(job)
            else:
                out.append(job)
        self.waited(answered, now)
        return out

    def _expire(self, at: float) -> list[Chunk]:
        """Rows in deeper queues that cannot finish their stage by their `Job.plan_by` if it starts at `at`."""
        late: list[Chunk] = []
        for k in range(1, self.num_stages):
            if not self.waiting[k]:
                continue
            need = at + self.times.predict(k, self.bucket(1))
            kept = []
            for chunk in self.waiting[k]:
                ok, gone = chunk.split(chunk.plan_by >= need)
                if gone is not None:
                    late.append(gone)
                if ok is not None and len(ok):
                    kept.append(ok)
            self.waiting[k] = kept
        return late
