"""Shutting down without losing a request: the grace period, `Connection: close`, then the drain.

On the first SIGTERM (or Ctrl-C) the service turns draining: `/readyz` answers 503, so a load
balancer takes the replica out of its pool, while the server keeps accepting and answering for
`drain_grace_s`; every response in that time carries `Connection: close`, so no keep-alive
connection is left with a request in flight when the listener closes. After the grace period
uvicorn closes the listener, finishes what it has read (up to `drain_timeout_s`) and stops the
models. A second signal skips what is left of the grace period; a third Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import ServiceSettings
from service.protocols.early import protocol_for

log = logging.getLogger("anytime.serve")
DRAIN_SIGNAL = signal.SIGUSR1  # supervisor → request process: drain as on SIGTERM


def _draining(app: FastAPI) -> bool:
    plane = getattr(app.state, "plane", None)
    return plane is not None and plane.draining


class CloseWhenDraining:
    """ASGI wrapper: while the service drains, every HTTP response says `Connection: close`."""

    def __init__(self, app: ASGIApp, service_app: FastAPI) -> None:
        self.app, self.service_app = app, service_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _draining(self.service_app):
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a grace period between the first signal and closing the listener."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float, supervised: bool = False) -> None:
        super().__init__(config)
        self.app, self.grace_s = app, grace_s
        app.state.ready_after_startup = True  # readiness waits for the warm-up over the socket
        # A request process drains when its supervisor sends DRAIN_SIGNAL, and ignores SIGTERM and SIGINT:
        # sent to the whole process group (Ctrl-C, `kill -- -PGID`), they reach the supervisor too.
        self.supervised = supervised
        if supervised:
            signal.signal(DRAIN_SIGNAL, self.handle_exit)
        self.grace_ends: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.supervised:  # signals to the whole process group are the supervisor's to act on
            if sig != DRAIN_SIGNAL:
                return
            sig = signal.SIGTERM
        plane = getattr(self.app.state, "plane", None)
        if plane is not None:
            plane.drain()
        if self.grace_ends is None and self.grace_s > 0 and not self.should_exit:
            self.grace_ends = time.monotonic() + self.grace_s
            log.info("draining: /readyz answers 503; closing the listener in %.1f s", self.grace_s)
            return
        super().handle_exit(sig, frame)  # second signal: stop now (a third Ctrl-C: force)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (the app's lifespan, then the listeners), then the warm-up over the listening
        socket, and only then readiness (service/warmup.py)."""
        await super().startup(sockets=sockets)
        plane = getattr(self.app.state, "plane", None)
        if plane is None or self.should_exit:
            return
        if plane.settings.warmup and self.servers and self.servers[0].sockets:
            from service.warmup import warm_over_socket

            host, port = self.servers[0].sockets[0].getsockname()[:2]
            await warm_over_socket(host, port, plane)
        plane.become_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The listener closes: from now on new calls that reach the server some other way (gRPC, a
        kept-alive connection) are refused with 503 / UNAVAILABLE, while those in flight finish."""
        plane = getattr(self.app.state, "plane", None)
        if plane is not None:
            plane.close()
        await super().shutdown(sockets=sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.grace_ends is not None and not self.should_exit and time.monotonic() >= self.grace_ends:
            self.should_exit = True
        return await super().on_tick(counter)


def draining_server(
    settings: ServiceSettings, app: FastAPI, stack: ASGIApp, *, bind: bool = True, supervised: bool = False
) -> DrainingServer:
    """uvicorn serving `stack` as every serving process runs it (`bind`: on the settings' host and port;
    else on sockets handed to `run`)."""
    address = {"host": settings.host, "port": settings.port} if bind else {}
    config = uvicorn.Config(
        stack,
        **address,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        access_log=False,
        # httptools (C parser; 12 % lower single-client latency than h11), refusing from the headers
        # what admission would refuse (service/protocols/early.py)
        http=protocol_for(app),
        loop="uvloop",
        proxy_headers=False,  # nothing uses client addresses; one ASGI layer less per request
    )
    return DrainingServer(config, app, settings.drain_grace_s, supervised=supervised)
