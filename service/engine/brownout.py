"""Brownout (ANYTIME_OVERLOAD=degrade): answer from earlier exits before refusing anything.

Admission tells the brownout, for each request with a deadline, how much of its budget the
predicted wait until exit 1 takes. While that share (smoothed) stays above `HIGH`, the deepest
exit new work may reach comes down one exit at a time; once it stays under `LOW` for `HOLD_S`,
it goes back up one exit at a time (hysteresis, so it does not flap). It never goes below the
accuracy floor: the shallowest exit whose validation accuracy is within ANYTIME_BROWNOUT_FLOOR_PP
of the final exit's. Rows already waiting for a stage past the new limit are answered at once
from the exit they passed (reason `max_exit`), which frees the engine right away.
"""

from __future__ import annotations

from collections.abc import Sequence

HIGH = 0.5  # degrade one more exit while waits take more than half the budgets
LOW = 0.2  # recover one exit once waits take under a fifth of the budgets ...
HOLD_S = 1.0  # ... for this long
STEP_S = 0.05  # at most one step down per this many seconds (let the last step take effect)
SMOOTHING = 0.1


def floor_exit(val_accuracy: Sequence[float | None], floor_pp: float) -> int:
    """The shallowest 1-based exit within `floor_pp` percentage points of the final exit's validation
    accuracy; the final exit when the manifest has no accuracies."""
    final = val_accuracy[-1]
    if final is None:
        return len(val_accuracy)
    for k, acc in enumerate(val_accuracy, start=1):
        if acc is not None and acc >= final - floor_pp:
            return k
    return len(val_accuracy)


class Brownout:
    """The deepest exit new work may reach, moved by how much of the deadlines the waits take."""

    def __init__(self, num_exits: int, floor: int, enabled: bool) -> None:
        self.num_exits, self.floor, self.enabled = num_exits, floor, enabled
        self.level = 0  # exits taken off the end
        self.pressure = 0.0
        self._changed = 0.0
        self._calm_since: float | None = None

    @property
    def max_exit(self) -> int:
        """The deepest exit new work may reach now (1-based)."""
        return self.num_exits - self.level

    def observe(self, wait_s: float, budget_s: float, now: float) -> bool:
        """One admission's predicted wait and its budget; True when the level changed."""
        if not self.enabled or budget_s <= 0:
            return False
        share = min(wait_s / budget_s, 4.0)
        self.pressure += SMOOTHING * (share - self.pressure)
        return self._step(now)

    def refused(self, now: float) -> bool:
        """A request would be refused: degrade now if that is still possible."""
        if not self.enabled:
            return False
        self.pressure = max(self.pressure, HIGH * 1.5)
        return self._step(now, urgent=True)

    def _step(self, now: float, urgent: bool = False) -> bool:
        if self.pressure > HIGH:
            self._calm_since = None
            if self.max_exit > self.floor and (urgent or now - self._changed >= STEP_S):
                self.level += 1
                self._changed = now
                return True
            return False
        if self.pressure < LOW and self.level > 0:
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= HOLD_S:
                self.level -= 1
                self._changed = now
                self._calm_since = now
                return True
        return False
