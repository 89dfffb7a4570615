"""The one route table: each path written once, served by FastAPI and (when hot) by the front door.

A `Route` names its path, methods, endpoint, the protocol's error renderer and its OpenAPI
description. `install` adds every route to the FastAPI app (so /openapi.json and /docs describe
them); `FrontDoor` answers the hot routes (the inference POSTs) without FastAPI's middleware and
router layers, which cost 0.12 ms of a 1.6 ms single-client round trip and 13–22 % of the CPU
per request at saturation (bundled model, interleaved runs, docs/benchmarks.md). Both call the
same `respond`, so an answer does not depend on which of the two served it (tested).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.routing import Match
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.dataplane import WARMUP_HEADER, WARMUP_TOKEN, warming_up
from service.errors import BODY_TOO_LARGE, ServiceError, internal_error, to_error

log = logging.getLogger("anytime.api")

Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]
Render = Callable[[ServiceError], Response]


@dataclass(frozen=True)
class Route:
    """One path of the API."""

    path: str
    endpoint: Endpoint
    render: Render  # the protocol's error body
    methods: tuple[str, ...] = ("GET",)
    hot: bool = False  # answered by the front door
    doc: dict[str, Any] = field(default_factory=dict)  # FastAPI's add_api_route keywords (OpenAPI)
    parameters: tuple[dict[str, Any], ...] = ()  # OpenAPI parameters beyond the path's own


async def respond(route: Route, request: Request) -> Response:
    """The route's answer, or its protocol's error body; no stack trace ever leaves."""
    if request.headers.get(WARMUP_HEADER) == WARMUP_TOKEN:  # the server's own warm-up (service/warmup.py)
        async with warming_up():
            return await _respond(route, request)
    return await _respond(route, request)


async def _respond(route: Route, request: Request) -> Response:
    try:
        return await route.endpoint(request)
    except Exception as exc:
        error = to_error(exc)
        if error is None:
            log.exception("unhandled error")
            error = internal_error()
        return route.render(error)


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", path)
    ]


def _handler(route: Route) -> Endpoint:
    async def handler(request: Request) -> Response:
        return await respond(route, request)

    handler.__doc__ = route.endpoint.__doc__
    return handler


def install(app: FastAPI, routes: Sequence[Route]) -> None:
    """Add every route to `app`, described in its OpenAPI schema."""
    for route in routes:
        doc = {"response_model": None, **route.doc}
        parameters = [*_path_parameters(route.path), *route.parameters]
        if parameters:
            doc["openapi_extra"] = {**doc.get("openapi_extra", {}), "parameters": parameters}
        app.add_api_route(route.path, _handler(route), methods=list(route.methods), name=route.endpoint.__name__, **doc)


class FrontDoor:
    """ASGI app: the hot routes answered directly, every other request by `app`."""

    def __init__(self, app: FastAPI, routes: Sequence[Route]) -> None:
        self.app = app
        self.routes = [(StarletteRoute(r.path, r.endpoint, methods=list(r.methods)), r) for r in routes if r.hot]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for matcher, route in self.routes:
                match, child = matcher.matches(scope)
                if match is Match.FULL:
                    await self._serve(route, {**scope, **child, "app": self.app}, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        plane = getattr(self.app.state, "plane", None)  # None: not started (tests without a lifespan)
        watch = plane.pushback.watch(scope, receive) if plane else None
        response = await respond(route, Request(scope, watch.receive if watch else receive))
        if watch is not None and watch.hold_s:
            await asyncio.sleep(max(0.0, watch.start + watch.hold_s - time.monotonic()))
        await response(scope, receive, send)
        if watch is not None:
            watch.answered(response.status_code, time.monotonic())


class BodyLimit:
    """ASGI wrapper: a request body over `limit` bytes (declared by Content-Length, or as it streams in)
    fails the endpoint's read with body_too_large (413), which the route's protocol renders."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = ServiceError(f"the request body exceeds {self.limit} bytes", BODY_TOO_LARGE)
        over = declared is not None and declared.isdigit() and int(declared) > self.limit
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if over:
                raise too_large
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return msg

        await self.app(scope, limited, send)
