"""The ASGI front door: the hottest inference routes go straight to their endpoints, the rest to FastAPI.

FastAPI's middleware and router layers cost 0.12 ms of a 1.6 ms single-client round trip and
13–22 % of the CPU per request at saturation (bundled model, interleaved runs, README
"Benchmarks"). The routes named here are matched with Starlette's own `Route` and served by the
same endpoint functions, with the same metering and error bodies (`service/errors.py`), as
through FastAPI; FastAPI still declares them, so /openapi.json and /docs describe them, and
every other method or path goes to FastAPI unchanged.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from service.errors import respond


class FrontDoor:
    """ASGI app: `routes` (POST only; each with its `protocol` label) answered directly, the rest by `app`."""

    def __init__(self, app: FastAPI, routes: list[tuple[Route, str]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route, protocol in self.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope = {**scope, **child, "app": self.app}
                    response = await respond(route.endpoint, Request(scope, receive), protocol)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
