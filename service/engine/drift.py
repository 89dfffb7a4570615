"""A label-free drift guard: how often each early exit agrees with the final exit, and what to do about it.

Shadow checks (service/engine.py) run a share of the samples that left early by confidence on to
the final exit and report here whether the two labels agree. `DriftGuard` keeps, per exit, a
window of those outcomes and exports them (`anytime_shadow_samples_total`,
`anytime_shadow_agreements_total`); the manifest's validation figure is
`anytime_exit_expected_agreement`, so Prometheus can alert when traffic drifts (docker/prometheus).

With adaptation on (ANYTIME_ADAPT), the guard also moves thresholds. The artifact allows an exit
to disagree with the final exit as often as it did on validation plus the accuracy budget ε:
`allowed = 1 − expected + ε`. When the disagreement's lower confidence bound exceeds that, the
exit's threshold goes up; when its upper bound is back under what validation saw (`1 − expected`),
it comes down, never below the artifact's. A step halves (up) or doubles (down) the distance to 1,
so one step is bounded and a few steps span the range. After a step the window starts afresh, since
the samples leaving at that exit are no longer the same population. A restart begins again from
the artifact's thresholds; a request's own `threshold` always wins.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

Z = 1.645  # one-sided 95 % Wilson bounds
MIN_SAMPLES = 100  # outcomes needed at an exit before its threshold may move
WINDOW = 2000  # outcomes kept per exit
CEILING = 0.999  # highest threshold adaptation sets: some samples still leave, so recovery stays visible


def wilson(failures: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of a proportion `failures / n`."""
    if n == 0:
        return 0.0, 1.0
    p = failures / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    return max(0.0, (centre - half) / denominator), min(1.0, (centre + half) / denominator)


class DriftGuard:
    """Agreement windows per exit, and (when `adapt`) the thresholds in force.

    `on_change(thresholds)` is called with the whole new threshold vector after every step.
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        expected: Sequence[float | None],
        epsilon: float,
        adapt: bool,
        on_change: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.artifact = np.array(thresholds, dtype=np.float64)
        self.thresholds = self.artifact.copy()
        self.expected = list(expected)
        self.epsilon = epsilon
        self.adapt = adapt
        self.on_change = on_change
        self.windows: list[deque[bool]] = [deque(maxlen=WINDOW) for _ in thresholds]
        self._lock = threading.Lock()

    def record(self, exit_index: int, agreed: bool) -> None:
        """One shadow outcome at 0-based `exit_index` (called from the worker thread)."""
        with self._lock:
            window = self.windows[exit_index]
            window.append(agreed)
            changed = self.adapt and self._step(exit_index, window)
            thresholds = self.thresholds.copy()
        if changed and self.on_change is not None:
            self.on_change(thresholds)

    def _step(self, k: int, window: deque[bool]) -> bool:
        expected = self.expected[k]
        if expected is None or len(window) < MIN_SAMPLES or k >= len(self.thresholds) - 1:
            return False
        n = len(window)
        low, high = wilson(n - sum(window), n)
        current = self.thresholds[k]
        if low > 1 - expected + self.epsilon and current < CEILING:
            new = min(CEILING, 1 - (1 - current) / 2)
        elif high < 1 - expected and current > self.artifact[k]:
            new = max(self.artifact[k], 1 - (1 - current) * 2)
        else:
            return False
        self.thresholds[k] = new
        window.clear()
        return True

    def agreement(self) -> list[float | None]:
        """The current window's agreement rate per exit (None without outcomes)."""
        with self._lock:
            return [sum(w) / len(w) if w else None for w in self.windows]
