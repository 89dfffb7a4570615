"""Refusal from the headers: under overload, a request admission would refuse is answered without
an ASGI task.

Past its capacity the server refuses most requests, and a refusal made by the endpoint cost the
event loop nearly what parsing and answering a request does (the ASGI task, Starlette's request,
the body read, the options, the response object): at three times the SLO capacity the loop spent
the core refusing while admitted requests waited for the worker, and goodput fell to half the
capacity (docs/server.md, "Deadlines"). `EarlyRefusal` is uvicorn's httptools protocol with one
step added: when a request's headers are complete it asks `classify.check_from_headers`, the
check before decoding itself (a `POST /classify` with a raw `image/*` body carries every option in
its query and headers); a refused request's body is then only fingerprinted as it arrives, for the
pushback on clients that resend at once, and the refusal is written to the socket when the body is
complete, counted in the metrics as the endpoint counts it. A request the check lets through goes
on to the app with its checked options (the endpoint does not check again); anything else goes on
unchanged: pipelined requests, `Expect: 100-continue`, other routes and body forms, a draining
server, the server's own warm-up, and every request more than `RECENT_S` after the last refusal.

The protocol also stamps every request with the start of the loop's round of reads that read its
first bytes (`ReadRound`, service/loop_lag.py): its budget counts from then, less the loop's lag.
"""

from __future__ import annotations

import asyncio
import functools
import http
import time
from dataclasses import dataclass
from typing import Any

import httptools
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import ServiceError
from service.loop_lag import READ_AT, ReadRound
from service.protocols import classify
from service.pushback import Watch
from service.served import Served

# The check runs only this soon after a refusal: at a load the server takes, it would be a second
# check before decoding, on every request, that never refuses.
RECENT_S = 0.1


@dataclass(slots=True)
class _Refused:
    """A request refused from its headers, its body still arriving."""

    model: Served
    error: ServiceError
    start: float
    keep_alive: bool
    watch: Watch | None  # the pushback's side (None: off)


@functools.cache
def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())


def _response(error: ServiceError, head: list[tuple[bytes, bytes]]) -> bytes:
    """The bytes of `classify.render(error)` after the headers in `head` (what the endpoint's refusal
    sends, without building a Starlette response)."""
    body = classify.error_json(error)
    lines = [_status_line(error.status)]
    for name, value in (*head, *((k.lower().encode(), v.encode()) for k, v in error.headers().items())):
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"content-length: %d\r\ncontent-type: application/json\r\n\r\n" % len(body))
    return b"".join(lines) + body


class EarlyRefusal(HttpToolsProtocol):
    """uvicorn's httptools protocol that refuses from the headers what admission would refuse."""

    service_app: FastAPI  # the app whose data plane decides (set by `protocol_for`)
    reads: ReadRound  # this server's rounds of socket reads (set by `protocol_for`)
    _refused: _Refused | None = None
    _read_at = 0.0  # the start of the round of reads in progress
    _begun = 0.0  # the start of the round that read this request's first bytes

    def data_received(self, data: bytes) -> None:
        self._read_at = self.reads.began(self.loop)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = self._read_at

    def on_headers_complete(self) -> None:
        self._refused = self._refusal()
        if self._refused is None:
            self.scope[READ_AT] = self._begun  # type: ignore[literal-required]
            super().on_headers_complete()

    def _refusal(self) -> _Refused | None:
        plane = getattr(self.service_app.state, "plane", None)
        if (
            plane is None
            or time.monotonic() - plane.refused_at > RECENT_S
            or self.parser.get_method() != b"POST"
            or self.expect_100_continue
            or self.pipeline
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.parser.should_upgrade()
        ):
            return None
        start = time.monotonic()
        url = httptools.parse_url(self.url)
        check = classify.check_from_headers(plane, url.path, url.query or b"", self.headers, self._begun)
        if check is None:
            return None
        if check.refusal is None:  # passed: the endpoint need not check again
            self.scope[classify.CHECKED] = (self._begun, check.options)  # type: ignore[literal-required]
            return None
        watch = plane.pushback.watch({"client": self.client, "path": url.path.decode("latin-1")})
        return _Refused(check.model, check.refusal, start, self.parser.should_keep_alive(), watch)

    def on_body(self, body: bytes) -> None:
        if self._refused is None:
            super().on_body(body)
        elif self._refused.watch is not None:
            self._refused.watch.body.add(body)

    def on_message_complete(self) -> None:
        refused, self._refused = self._refused, None
        if refused is None:
            super().on_message_complete()
            return
        hold_s = refused.watch.complete() if refused.watch is not None else 0.0
        if not hold_s:
            self._respond(refused, refused.error, None)
            return
        # In place of the connection's cycle while the refusal is held: a request pipelined behind it
        # waits in uvicorn's pipeline, as it does behind any response in progress.
        self.cycle = held = _Held()  # type: ignore[assignment]
        self.flow.pause_reading()
        wait = max(0.0, refused.start + hold_s - time.monotonic())
        self.loop.call_later(wait, self._respond, refused, self.service_app.state.plane.pushback.refusal(hold_s), held)

    def _respond(self, refused: _Refused, error: ServiceError, held: _Held | None) -> None:
        status = error.status
        keep_alive = refused.keep_alive and (held is None or held.keep_alive)
        if not self.transport.is_closing():
            head = self.server_state.default_headers
            self.transport.write(_response(error, head if keep_alive else [*head, (b"connection", b"close")]))
            if keep_alive:
                self.on_response_complete()  # uvicorn's own: the next pipelined request, or the keep-alive timer
            else:
                self.server_state.total_requests += 1
                self.transport.close()
        if held is not None:
            held.response_complete = True
        if refused.watch is not None:
            refused.watch.answered(status, time.monotonic())
        plane = self.service_app.state.plane
        plane.metrics.refused_from_headers.inc()
        plane.meter_refusal(classify.PROTOCOL, refused.model, status, refused.start)


class _Held:
    """What uvicorn reads of a connection's cycle, for a refusal being held."""

    def __init__(self) -> None:
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = True  # uvicorn's shutdown turns it off: the connection closes after the refusal
        self.message_event = asyncio.Event()


def protocol_for(app: FastAPI) -> type[EarlyRefusal]:
    """The protocol class uvicorn serves `app`'s stack with (`uvicorn.Config(http=...)`)."""
    attributes: dict[str, Any] = {"service_app": app, "reads": ReadRound()}
    return type("EarlyRefusal", (EarlyRefusal,), attributes)
