"""How far behind the event loop runs: the wait a request had before the server could read it.

A request's budget counts from when it arrived, but the server first sees it when the event loop
reads it; while the loop is busy (parsing and refusing other requests, or waiting for the worker
thread's turn on the interpreter) the bytes wait in the socket, and a budget counted from the
handler's start would promise time the client no longer has. While requests come, `LoopLag` wakes
every `period_s` and records how late it woke; after a second without one it stops (a timer every
2 ms took 7 % of an idle core on this task's VM, every 10 ms 3 %), and an idle loop has no lag.
The lag is the mean lateness over the last `window_s`, or how long the current wake-up is overdue
when that is more: a short window, so that a stall that has ended stops counting against the
requests after it, and the mean rather than the maximum, since on a core shared with another
process the loop is descheduled now and then for a time slice, and counting every request as if
it had waited the longest slice refused 42 % of a light load (docs/server.md, "Deadlines").

The timer's lateness is the wait until the loop's next round of socket reads; a request also waits
for the reads and refusals ahead of it in that round and for the callbacks queued before its
handler. So a request is timed from the round that read its first bytes (`ReadRound`, kept by the
HTTP protocol, service/protocols/early.py), less the lag, not from its handler's start.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping
from typing import Any

IDLE_S = 1.0  # no request asked for this long: the timer stops until the next one
READ_AT = "anytime.read_at"  # ASGI scope key: when the loop's round that read the request's first bytes began


def read_at(scope: Mapping[str, Any]) -> float:
    """When the request's first bytes were read (the start of that round of reads), else now."""
    return scope.get(READ_AT) or time.monotonic()


class ReadRound:
    """When the event loop's current round of socket reads began: the first read since the loop last ran
    its queued callbacks. Every read of one round waited in its socket at least from then."""

    def __init__(self) -> None:
        self._began: float | None = None

    def began(self, loop: asyncio.AbstractEventLoop) -> float:
        """The round's start, called as a read arrives (the first read of a round starts it)."""
        if self._began is None:
            self._began = time.monotonic()
            loop.call_soon(self._end)  # runs after this round's reads, before the loop polls again
        return self._began

    def _end(self) -> None:
        self._began = None


class LoopLag:
    """Lateness of a short periodic timer on the event loop, averaged over a recent window."""

    def __init__(
        self, period_s: float = 0.01, window_s: float = 0.05, report: Callable[[float], None] | None = None
    ) -> None:
        self.period_s, self.window_s, self.report = period_s, window_s, report
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._sum = 0.0
        self._last: float | None = None  # the last wake-up (None: not measuring)
        self._asked = 0.0  # when a request last asked
        self._wanted = asyncio.Event()
        self._epoch = 0  # counts `forget` calls: a wake-up whose sleep began before one is not a sample

    async def run(self) -> None:
        """Measure until cancelled (a task of the app's lifespan), while requests come."""
        reported = 0.0
        while True:
            if self._last is not None and time.monotonic() - self._asked > IDLE_S:
                self._idle()
            if self._last is None:  # idle, or forgotten: a request asked since then has set `_wanted`
                await self._wanted.wait()  # an idle loop keeps time: nothing to measure
                self._last = time.monotonic()
            start, epoch = time.monotonic(), self._epoch
            await asyncio.sleep(self.period_s)
            if epoch != self._epoch:
                continue  # forgotten while it slept
            self.sample(time.monotonic(), start + self.period_s)
            if self.report is not None and self._last - reported >= self.window_s:
                self.report(self._lag())
                reported = self._last

    def forget(self) -> None:
        """Drop what was measured, including the wake-up in progress: the server's own blocking steps
        before it is ready (the heap freeze, the warm-up over the socket) are no request's wait, and a
        stall of 170 ms kept in the window counted every request of the next 50 ms as out of time."""
        self._epoch += 1
        self._idle()

    def _idle(self) -> None:
        self._samples.clear()
        self._sum, self._last = 0.0, None
        self._wanted.clear()
        if self.report is not None:
            self.report(0.0)

    def sample(self, now: float, due: float) -> None:
        """One wake-up at `now` of a timer due at `due`."""
        late = max(0.0, now - due)
        self._samples.append((now, late))
        self._sum += late
        self._last = now
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._sum -= self._samples.popleft()[1]

    def current(self) -> float:
        """The loop's lag in seconds (0 when it keeps time, or when it was idle: then it starts measuring)."""
        self._asked = time.monotonic()
        if self._last is None:
            self._wanted.set()
            return 0.0
        return self._lag()

    def _lag(self) -> float:
        if self._last is None:
            return 0.0
        overdue = max(0.0, time.monotonic() - self._last - self.period_s)
        mean = max(0.0, self._sum / len(self._samples)) if self._samples else 0.0
        return max(overdue, mean)
