"""How many admitted jobs may wait for exit 1 at once: a limit learnt from their outcomes (AIMD).

Admission predicts a new job's exit 1 from the queue ahead and the stage times, but on a core the
event loop shares, what the worker gets of it depends on how much the loop takes: under overload
the loop reading and admitting requests preempts the worker's runs, each run takes several times
its figure, and jobs admitted by the prediction wait past their deadline in stage 1's queue or in
a stretched run. Work admitted and then lost costs the loop its decoding, its timer and a late
refusal, and the worker runs whose rows nobody reads (receive livelock: Mogul & Ramakrishnan,
1997). The limit is the cure of TCP's congestion window and of adaptive concurrency limits
(Netflix's concurrency-limits, Envoy's adaptive concurrency): a job that passes exit 1 by the time
its answer is due (`Job.plan_by`: its deadline less the answer margin) raises it by 1/limit (one
more job per limit's worth of successes), a job that misses exit 1 by its deadline cuts it by
`CUT`, once per generation (jobs admitted before the last cut do not cut it again, so one stall's
burst of losses counts once). A job in between, exit 1 after its answer was due but by its
deadline, is a near miss and leaves the limit as it is, as TCP Vegas stops growing its window when
the queue's delay rises before packets are lost: raised on near misses, the limit kept probing
into losses (docs/server.md, "Admitted work is capped by what made its deadline"). It starts at
the queue's size, so that only losses bring it down, and never goes below 1, so that an idle
engine always admits.

Runs under the engine's lock, in the engine's process, like the scheduler that owns it.
"""

from __future__ import annotations

CUT = 0.75  # a lost job's cut: the limit halves in between two and three generations


def allows(limit: float, in_flight: int) -> bool:
    """Whether a limit of `limit` admits one more job with `in_flight` already waiting for exit 1 (the
    engine's own limit, or the one an engine process published to its request processes)."""
    return in_flight < max(1, int(limit))


class InflightLimit:
    """The number of admitted jobs that may be waiting for exit 1 (queued for stage 1, or in its run)."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = float(max(ceiling, 1))
        self.value = self.ceiling
        self._cut_at = -float("inf")  # when the limit was last cut

    def passed(self) -> None:
        """A job passed exit 1 by the time its answer was due."""
        self.value = min(self.ceiling, self.value + 1.0 / self.value)

    def lost(self, admitted: float, now: float) -> None:
        """A job admitted at `admitted` missed exit 1 by its deadline (seen at `now`)."""
        if admitted > self._cut_at:
            self.value = max(1.0, self.value * CUT)
            self._cut_at = now
