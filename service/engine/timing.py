"""Online estimates of each stage's time (stage k plus exit head k) by batch size.

Seeded from the artifact's latency profile (and replaced by the warm-up's measurements), updated
with an exponential moving average of what the engine measures, so predictions follow the machine
when it slows down or speeds up. Batch sizes between measured ones are interpolated linearly;
beyond them, extrapolated from the per-sample cost of the nearest measured size.

Estimates only learn from runs, and admission refuses work whose predicted time misses its
deadline: an estimate that a slow spell raised could refuse every request and never be measured
again. So a stage not measured for `STALE_S` falls back to its baseline (the warm-up's figures)
wherever that is lower, and the next runs measure it afresh.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Sequence

from models.artifact import ExitInfo

OUTLIER = 2.0  # one measurement raises an estimate by at most this factor
STALE_S = 1.0  # an estimate not measured for this long falls back to its baseline where that is lower


class StageTimes:
    """Predicts and learns per-stage seconds as a function of batch size."""

    def __init__(self, num_stages: int, smoothing: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.num_stages = num_stages
        self.smoothing = smoothing
        self.clock = clock
        self._table: list[dict[int, float]] = [{} for _ in range(num_stages)]
        self._baseline: list[dict[int, float]] = [{} for _ in range(num_stages)]
        self._seen = [clock()] * num_stages  # when each stage was last measured
        self._memo: list[dict[int, float]] = [{} for _ in range(num_stages)]  # predictions since the last change
        self._base_memo: list[dict[int, float]] = [{} for _ in range(num_stages)]  # `baseline`, until a `set`
        self._lock = threading.Lock()

    @classmethod
    def from_manifest(cls, exits: Sequence[ExitInfo]) -> StageTimes:
        """Seed from the manifest's latency profile (stage + head, per batch size)."""
        times = cls(len(exits))
        for k, e in enumerate(exits):
            for bs, t in e.latency_ms.items():
                times._table[k][int(bs)] = times._baseline[k][int(bs)] = (t.stage_ms + t.head_ms) / 1e3
        return times

    def observe(self, stage: int, batch: int, seconds: float) -> None:
        """Fold one measurement into the estimate for (stage, batch). One measurement counts as at most
        twice the estimate (`OUTLIER`): a pause of the whole process (a page-fault storm, the thread
        descheduled) must not make every later prediction refuse work. A faster run counts in full."""
        with self._lock:
            self._seen[stage] = self.clock()
            table = self._table[stage]
            prior = table.get(batch) or self._predict(stage, batch)
            if prior > 0:
                table[batch] = prior + self.smoothing * (min(seconds, prior * OUTLIER) - prior)
            else:
                table[batch] = seconds
            self._memo[stage].clear()

    def set(self, stage: int, batch: int, seconds: float) -> None:
        """Replace the estimate and the baseline for (stage, batch) with a measurement (warm-up)."""
        with self._lock:
            self._table[stage][batch] = self._baseline[stage][batch] = seconds
            self._seen[stage] = self.clock()
            self._memo[stage].clear()
            self._base_memo[stage].clear()

    def predict(self, stage: int, batch: int) -> float:
        """Predicted seconds of stage `stage` (0-based) and its exit for `batch` samples; 0 if unknown.
        Remembered until the stage's estimates change: admission and planning ask a few per request."""
        if stage >= self.num_stages:
            return 0.0
        with self._lock:
            now = self.clock()
            memo = self._memo[stage]
            if now - self._seen[stage] > STALE_S and self._baseline[stage]:
                table = self._table[stage]
                self._table[stage] = {bs: min(table.get(bs, t), t) for bs, t in self._baseline[stage].items()}
                self._seen[stage] = now
                memo.clear()
            t = memo.get(batch)
            if t is None:
                t = memo[batch] = self._predict(stage, batch)
            return t

    def _predict(self, stage: int, batch: int) -> float:
        table = self._table[stage]
        if not table:
            return 0.0
        sizes = sorted(table)
        # A stage costs no more for fewer rows: never predict above a larger batch's estimate.
        larger = [table[s] for s in sizes if s >= batch]
        if batch in table:
            return min(larger)
        i = bisect.bisect_left(sizes, batch)
        if i == 0:
            return min(larger)  # fewer samples than the smallest measured batch: no cheaper than it
        if i == len(sizes):
            top = sizes[-1]
            return table[top] * batch / top
        lo, hi = sizes[i - 1], sizes[i]
        w = (batch - lo) / (hi - lo)
        return min(table[lo] * (1 - w) + table[hi] * w, min(larger))

    def baseline(self, stage: int, batch: int) -> float:
        """The warm-up's (or the manifest's) figure for (stage, batch), interpolated as `predict` does;
        the current estimate where there is none. Remembered until the next `set` (admission asks per request)."""
        with self._lock:
            base = self._baseline[stage]
            if not base:
                return self._predict(stage, batch)
            memo = self._base_memo[stage]
            if batch not in memo:
                table, self._table[stage] = self._table[stage], base
                try:
                    memo[batch] = self._predict(stage, batch)
                finally:
                    self._table[stage] = table
            return memo[batch]

    def snapshot(self) -> list[dict[int, float]]:
        """A copy of the current estimates (for /v1/model and tests)."""
        with self._lock:
            return [dict(t) for t in self._table]


class AnswerMargin:
    """How long before a request's deadline the event loop stops waiting for the worker and answers
    from the exit the row passed, so that the answer still leaves in time: a timer set for the
    deadline itself always fires after it, and later still when the loop is busy parsing requests.

    A streaming estimate (frugal quantile: each sample moves it by a fixed step, up with weight
    `quantile`, down with the rest) of how late the loop wakes after its deadline timer, learnt from
    every answer the timer gave; held within [floor_s, cap_s], and never more than a quarter of a
    request's budget. The lateness is measured from when the timer was due, so the margin in force
    does not feed back into what it learns. The floor is the event loop's timer resolution: uvloop
    (libuv) keeps timers in whole milliseconds, so an idle loop wakes up to 1 ms after its timer on
    any machine; it starts at three times that, so that a fresh server is in time before it has learnt
    (at twice, one of eight answers of a fresh server without warm-up left late on a slow VM).

    A long budget also keeps `budget_share` of itself: a VM's stalls are rare (the learnt percentile
    does not see them) but last milliseconds whatever the budget, and an idle loop that wakes 4 ms after
    its timer turns a 200 ms request whose exit 1 was ready long before into a 504. At 10 ms budgets the
    share is below the floor and changes nothing."""

    def __init__(
        self,
        initial_s: float = 3e-3,
        floor_s: float = 1e-3,
        cap_s: float = 5e-3,
        quantile: float = 0.99,
        step_s: float = 0.1e-3,
        budget_share: float = 0.05,
    ) -> None:
        self.floor_s, self.cap_s, self.quantile, self.step_s = floor_s, cap_s, quantile, step_s
        self.budget_share = budget_share
        self.estimate_s = initial_s

    def observe(self, late_s: float) -> None:
        """One timer's lateness: how long after it was due the answer was ready to leave."""
        if late_s > self.estimate_s:
            self.estimate_s += self.step_s * self.quantile
        else:
            self.estimate_s -= self.step_s * (1 - self.quantile)
        self.estimate_s = min(max(self.estimate_s, self.floor_s), self.cap_s)

    def for_budget(self, budget_s: float) -> float:
        """The margin for a request with `budget_s` seconds in all."""
        budget_s = max(budget_s, 0.0)
        return min(max(self.estimate_s, self.budget_share * budget_s), 0.25 * budget_s)


class Slowdown:
    """How many times longer than predicted admitted jobs take to pass exit 1, so that admission predicts
    the wait they will see rather than the one the stage times add up to.

    The stage times are what a run takes once it runs. Under overload on a shared core, the event loop
    parsing requests takes the CPU between runs (the worker runs at a lower priority), so jobs wait
    several times longer than the queue ahead of them predicts, and admission that trusts the
    prediction lets in work that then misses its deadline: decoded, queued and refused after all
    (504), at a cost a refusal at admission does not have. Each step reports its jobs' waits against
    their predictions (a job dropped unreached counts what it waited so far, a lower bound); the
    factor is their smoothed ratio, never below 1, and one step raises it at most `OUTLIER` times.
    A wait predicted shorter than `min_wait_s` counts as that long, in the ratio and in the
    correction, since the worker's turn on the CPU costs the same however short the queue. Not
    measured for `hold_s` (admission refused everything), the factor decays to 1 with time constant
    `decay_s`, so that admission opens again gradually and measures afresh.
    """

    def __init__(
        self,
        smoothing: float = 0.2,
        min_wait_s: float = 2e-3,
        cap: float = 50.0,
        hold_s: float = 0.1,
        decay_s: float = 0.25,
    ) -> None:
        self.smoothing, self.min_wait_s, self.cap = smoothing, min_wait_s, cap
        self.hold_s, self.decay_s = hold_s, decay_s
        self._factor = 1.0
        self._seen = 0.0

    def observe(self, predicted_s: Sequence[float], waited_s: Sequence[float], now: float) -> None:
        """One step's jobs at `now`: the wait each was predicted at admission and the one it had."""
        if not predicted_s:
            return
        floor = self.min_wait_s
        ratio = sum(w / max(p, floor) for p, w in zip(predicted_s, waited_s, strict=True)) / len(predicted_s)
        f = self.factor(now)
        f += self.smoothing * (min(ratio, f * OUTLIER) - f)
        self._factor = min(max(f, 1.0), self.cap)
        self._seen = now

    @property
    def state(self) -> tuple[float, float]:
        """(the learnt factor, when it was last measured): what `restored` rebuilds it from."""
        return self._factor, self._seen

    @classmethod
    def restored(cls, state: tuple[float, float]) -> Slowdown:
        """A slowdown with default settings in `state` (a copy, or one published by another process)."""
        other = cls()
        other._factor, other._seen = state
        return other

    def factor(self, now: float) -> float:
        """The factor in force at `now`."""
        if self._factor == 1.0:
            return 1.0
        return 1.0 + (self._factor - 1.0) * math.exp(-max(0.0, now - self._seen - self.hold_s) / self.decay_s)

    def wait(self, predicted_s: float, now: float) -> float:
        """The wait to expect at `now` for one predicted from the stage times."""
        f = self.factor(now)
        return predicted_s if f == 1.0 else predicted_s + (f - 1.0) * max(predicted_s, self.min_wait_s)
