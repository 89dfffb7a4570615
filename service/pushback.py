"""Pushback on clients that resend at once after a refusal.

A refusal costs the event loop about as much as parsing the request, so clients that resend the
moment they are refused (a retry loop without backoff, ignoring Retry-After) can keep the loop
busy refusing while admitted requests wait to be read and answered: goodput falls to nothing,
however well admission predicts. A connection whose requests come at once after a refusal (within
`at_once_s`, plus the loop's current lag, of the refusal leaving), twice in a row, gets its next
refusal without an admission attempt, held for `hold_s` before it leaves: the connection then has
nothing to resend for that long, at the cost of a timer. The request after a held refusal is served
as usual, so every such connection still gets an admission attempt per `hold_s`. An open-loop
client's request follows a refusal that closely only now and then, and twice in a row rarely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.engine import QueueFull

REFUSALS = (503, 504)
STALE_S = 1.0  # entries older than this are dropped when the table is full


@dataclass(slots=True)
class _Connection:
    refused_at: float  # when its last refusal left
    held: bool  # that refusal was a held one
    resends: int = 0  # its requests in a row that came at once after a refusal


class Pushback:
    """Per-connection memory of the last refusal, and the decision to hold the next one."""

    def __init__(
        self,
        hold_s: float,
        at_once_s: float = 5e-3,
        lag: Callable[[], float] = lambda: 0.0,
        held: Callable[[], None] = lambda: None,
        size: int = 65_536,
    ) -> None:
        self.hold_s, self.at_once_s, self.lag, self.held, self.size = hold_s, at_once_s, lag, held, size
        self._last: dict[Any, _Connection] = {}

    def hold_for(self, client: Any, now: float) -> float:
        """How long this request's refusal is held (0: serve it as usual). `client` names its connection."""
        if self.hold_s <= 0 or client is None or (c := self._last.get(client)) is None:
            return 0.0
        at_once = now - c.refused_at <= self.at_once_s + self.lag()
        c.resends = c.resends + 1 if at_once else 0
        if c.resends < 2 or c.held:
            return 0.0
        self.held()
        return self.hold_s

    def refusal(self) -> QueueFull:
        """The 503 of a request resent at once."""
        return QueueFull(
            f"resent at once after refusals on this connection: refused without an attempt and held "
            f"{self.hold_s * 1e3:.0f} ms; wait for Retry-After before resending",
            retry_after_s=1.0,
        )

    def answered(self, client: Any, status: int, now: float, held: bool) -> None:
        """A response left on `client`'s connection."""
        if client is None or self.hold_s <= 0:
            return
        if status not in REFUSALS:
            self._last.pop(client, None)
            return
        if len(self._last) >= self.size:
            self._last = {k: c for k, c in self._last.items() if now - c.refused_at < STALE_S}
        previous = self._last.get(client)
        self._last[client] = _Connection(now, held, previous.resends if previous else 0)
