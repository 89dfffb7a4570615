"""How far behind the event loop runs: the wait a request had before the server could read it.

A request's budget counts from when it arrived, but the server first sees it when the event loop
reads it; while the loop is busy (parsing and refusing other requests, or waiting for the worker
thread's turn on the interpreter) the bytes wait in the socket, and a budget counted from the
handler's start would promise time the client no longer has. `LoopLag` wakes every `period_s`
and records how late it woke; the lag is the mean lateness over the last `window_s` (or how
long the current wake-up is overdue, when that is more). A short window, so that a stall that has
ended stops counting against the requests that come after it. The mean rather than the maximum: on a
core shared with another process the loop is descheduled now and then for a time slice, and
counting every request as if it had waited the longest slice refused 40 % of a light load (bench
figures in docs/server.md, "Deadlines").
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable


class LoopLag:
    """Lateness of a short periodic timer on the event loop, averaged over a recent window."""

    def __init__(
        self, period_s: float = 0.002, window_s: float = 0.02, report: Callable[[float], None] | None = None
    ) -> None:
        self.period_s, self.window_s, self.report = period_s, window_s, report
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._sum = 0.0
        self._last: float | None = None  # the last wake-up (None: not measuring yet)

    async def run(self) -> None:
        """Measure until cancelled (a task of the app's lifespan)."""
        reported, self._last = 0.0, time.monotonic()
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.period_s)
            self.sample(time.monotonic(), start + self.period_s)
            if self.report is not None and self._last - reported >= self.window_s:
                self.report(self.current())
                reported = self._last

    def sample(self, now: float, due: float) -> None:
        """One wake-up at `now` of a timer due at `due`."""
        late = max(0.0, now - due)
        self._samples.append((now, late))
        self._sum += late
        self._last = now
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._sum -= self._samples.popleft()[1]

    def current(self) -> float:
        """The loop's lag in seconds (0 when it keeps time, or before it measures)."""
        if self._last is None:
            return 0.0
        overdue = max(0.0, time.monotonic() - self._last - self.period_s)
        mean = max(0.0, self._sum / len(self._samples)) if self._samples else 0.0
        return max(overdue, mean)
