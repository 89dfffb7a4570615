"""Pushback on clients that resend a refused request at once.

A refusal costs the event loop about as much as parsing the request, so clients that resend the
moment they are refused (a retry loop without backoff, ignoring Retry-After) can keep the loop
busy refusing while admitted requests wait to be read and answered: goodput falls to nothing,
however well admission predicts. A connection that sends a refused request again at once (within
`at_once_s`, plus the loop's current lag, of the refusal leaving), twice in a row, gets its next
refusal without an admission attempt, held for about `hold_s` before it leaves: the connection then
has nothing to resend for that long, at the cost of a timer. The request after a held refusal is
served as usual, so every such connection still gets an admission attempt per hold. Each hold is
drawn uniformly from 0.5-1.5x `hold_s`: a burst refuses many connections in the same milliseconds,
and holds of one length sent them all back in the same milliseconds, another burst, with the core
idle in between (docs/server.md, "Deadlines").

"Again" means the same path and body. Timing alone cannot tell a retry loop from a client with a
connection pool: at a few hundred requests a second its next request, another image, follows a
refusal on the connection the refusal freed within milliseconds, and holding it made an open-loop
client's refusals take 200 ms (docs/server.md, "Deadlines").
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Receive, Scope

from service.engine import QueueFull

REFUSALS = (503, 504)
JITTER = 0.5  # a hold lasts hold_s times a uniform draw from [1 - JITTER, 1 + JITTER]
STALE_S = 1.0  # entries older than this are dropped when the table is full
SAMPLE_BYTES = 65_536  # a body over twice this is told apart by its length and its first and last this many bytes


class BodySample:
    """What a fingerprint reads of a body, kept as its chunks stream in: the whole body up to
    2 * SAMPLE_BYTES; beyond that its length and its first and last SAMPLE_BYTES. Views, not copies:
    a large upload is neither copied nor kept beyond its last chunks for this."""

    def __init__(self) -> None:
        self.length = 0
        self.head = b""
        self._tail: collections.deque[memoryview] = collections.deque()
        self._tail_bytes = 0

    def add(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        self.length += len(view)
        if len(self.head) < SAMPLE_BYTES:
            take = SAMPLE_BYTES - len(self.head)
            self.head, view = self.head + bytes(view[:take]), view[take:]
        if len(view):
            self._tail.append(view)
            self._tail_bytes += len(view)
            while self._tail_bytes - len(self._tail[0]) >= SAMPLE_BYTES:
                self._tail_bytes -= len(self._tail.popleft())

    def fingerprint(self, path: str) -> int:
        """What tells one request from another: its path and (the sample of) its body."""
        need, parts = SAMPLE_BYTES, []
        for part in reversed(self._tail):  # the last SAMPLE_BYTES: all of the rest, up to twice that
            parts.append(part[-need:])
            need -= len(parts[-1])
            if need <= 0:
                break
        tail = b"".join(reversed(parts))
        if self.length <= 2 * SAMPLE_BYTES:  # nothing was left out
            return hash((path, self.head + tail))
        return hash((path, self.length, self.head, tail))


def fingerprint(path: str, chunks: Sequence[bytes]) -> int:
    """The fingerprint of a request to `path` whose body came in `chunks`."""
    sample = BodySample()
    for chunk in chunks:
        sample.add(chunk)
    return sample.fingerprint(path)


@dataclass(slots=True)
class _Connection:
    refused_at: float  # when its last refusal left
    held: bool  # that refusal was a held one
    request: int  # the refused request's fingerprint
    resends: int  # how many times in a row that request came again at once after its refusal


class Pushback:
    """Per-connection memory of the last refusal, and the decision to hold the next one."""

    def __init__(
        self,
        hold_s: float,
        at_once_s: float = 5e-3,
        lag: Callable[[], float] = lambda: 0.0,
        held: Callable[[], None] = lambda: None,
        size: int = 65_536,
        rng: random.Random | None = None,
    ) -> None:
        self.hold_s, self.at_once_s, self.lag, self.held, self.size = hold_s, at_once_s, lag, held, size
        self.rng = rng or random.Random()
        self._last: dict[Any, _Connection] = {}

    def watch(self, scope: Scope, receive: Receive | None = None) -> Watch | None:
        """One HTTP request's side of the pushback (None: off, or no connection to name)."""
        client = scope.get("client")
        if self.hold_s <= 0 or client is None:
            return None
        return Watch(self, client, scope.get("path", ""), time.monotonic(), receive)

    def watching(self, client: Any) -> bool:
        """The connection's last response was a refusal: its next request may be that one resent."""
        return client in self._last

    def resent(self, client: Any, start: float, request: int) -> tuple[int, float]:
        """For a request that started at `start` with fingerprint `request`: how many times in a row the
        refused request has come again at once, counting this one (0: another request, or later), and how
        long its refusal is held (0: serve it as usual)."""
        c = self._last.get(client)
        if c is None or c.request != request or start - c.refused_at > self.at_once_s + self.lag():
            return 0, 0.0
        if c.resends + 1 < 2 or c.held:
            return c.resends + 1, 0.0
        self.held()
        return c.resends + 1, self.hold_s * self.rng.uniform(1 - JITTER, 1 + JITTER)

    def refusal(self, hold_s: float) -> QueueFull:
        """The 503 of a request resent at once, held `hold_s`."""
        return QueueFull(
            f"resent at once after refusals on this connection: refused without an attempt and held "
            f"{hold_s * 1e3:.0f} ms; wait for Retry-After before resending",
            retry_after_s=1.0,
        )

    def answered(self, client: Any, status: int, now: float, held: bool, request: int, resends: int) -> None:
        """A response left on `client`'s connection for the request with fingerprint `request`."""
        if client is None or self.hold_s <= 0:
            return
        if status not in REFUSALS:
            self._last.pop(client, None)
            return
        if len(self._last) >= self.size:
            self._last = {k: c for k, c in self._last.items() if now - c.refused_at < STALE_S}
        self._last[client] = _Connection(now, held, request, resends)


class Watch:
    """One request's side of the pushback: keeps the body as the endpoint reads it and, once the body is
    complete, raises the held refusal from `receive` if it is the refused request resent at once the
    second time in a row (the endpoint renders it in its protocol's form, as it does a body too large)."""

    def __init__(self, pushback: Pushback, client: Any, path: str, start: float, receive: Receive | None) -> None:
        self.pushback, self.client, self.path, self.start, self._receive = pushback, client, path, start, receive
        self.body = BodySample()
        self.hold_s = 0.0  # > 0: its refusal is held this long from `start`
        self.resends = 0
        self._request: int | None = None

    async def receive(self) -> Message:
        assert self._receive is not None
        message = await self._receive()
        if message["type"] == "http.request":
            self.body.add(message.get("body", b""))
            if not message.get("more_body", False) and self.complete():
                raise self.pushback.refusal(self.hold_s)
        return message

    def complete(self) -> float:
        """The body is all in: how long the request's refusal is held (0: not held, it is served or
        refused as usual)."""
        if self.pushback.watching(self.client):
            self.resends, self.hold_s = self.pushback.resent(self.client, self.start, self.request())
        return self.hold_s

    def request(self) -> int:
        """This request's fingerprint (of the body read so far)."""
        if self._request is None:
            self._request = self.body.fingerprint(self.path)
        return self._request

    def answered(self, status: int, now: float) -> None:
        """Its response has left."""
        refused = status in REFUSALS
        self.pushback.answered(
            self.client, status, now, bool(self.hold_s), self.request() if refused else 0, self.resends
        )
