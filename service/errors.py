"""Every failure as one JSON error body `{"error": {"code", "message"}}`, mapped in one place.

`api_error` turns the engine's and the image decoder's exceptions into HTTP errors;
`MeteredRoute` counts every inference request by its final status and times it, whatever the
route returns or raises; `install_error_handlers` renders errors; `BodyLimitMiddleware` caps
request bodies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine import DeadlineUnreachable, EngineFailure, EngineStopped, QueueFull
from service.images import ImageRejected
from service.registry import ModelNotFound
from service.served import InvalidOption

log = logging.getLogger("anytime.api")
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before the answer


class ApiError(Exception):
    """An error answered with `status` and a JSON body; `headers` e.g. Retry-After."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """Pydantic/FastAPI validation errors as one sentence naming each bad option."""
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_STATUS_CODES = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
    415: "unsupported_media_type",
}  # fmt: skip


def api_error(exc: BaseException) -> ApiError | None:
    """The HTTP error an exception from the engine, the decoder or validation stands for; None if unknown."""
    match exc:
        case ApiError():
            return exc
        case ImageRejected():
            return ApiError(exc.status, exc.code, exc.message)
        case InvalidOption():
            return ApiError(422, "invalid_option", str(exc))
        case ModelNotFound():
            return ApiError(404, "model_not_found", str(exc.args[0]))
        case RequestValidationError():
            return ApiError(422, "invalid_option", validation_message(list(exc.errors())))
        case StarletteHTTPException():  # e.g. Starlette's multipart parser: 400 "Too many fields"
            code = _STATUS_CODES.get(exc.status_code, "http_error")
            return ApiError(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))  # keeps Allow on 405
        case QueueFull():
            return ApiError(503, "overloaded", "the server is at capacity; retry shortly", {"Retry-After": "1"})
        case EngineStopped():
            return ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        case DeadlineUnreachable():
            return ApiError(504, "deadline_exceeded", str(exc))
        case TimeoutError():
            return ApiError(504, "timeout", "no answer within the server's request timeout")
        case EngineFailure():
            return ApiError(500, "inference_failed", str(exc))
    return None


Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]


async def call_metered(endpoint: Endpoint, request: Request, protocol: str = "http") -> Response:
    """Run an inference endpoint, count it by protocol and final status and time it; known errors come
    out as ApiError."""
    start = time.monotonic()
    status = 500
    try:
        response = await endpoint(request)
        status = response.status_code
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED  # the client hung up: not a server error
        raise
    except Exception as exc:
        error = api_error(exc)
        if error is None:
            raise
        status = error.status
        raise error from None
    finally:
        served = getattr(request.state, "served", None)  # set once the request's model is known
        if served is not None:
            served.metrics.request(protocol, status)
            served.metrics.request_latency.observe(time.monotonic() - start)
        else:
            metrics = request.app.state.service.metrics
            metrics.requests.labels("", "", protocol, str(status)).inc()
            metrics.request_latency.labels("", "").observe(time.monotonic() - start)


async def respond(endpoint: Endpoint, request: Request, protocol: str = "http") -> Response:
    """`call_metered`, with every error rendered as the JSON error body (no stack trace leaves)."""
    try:
        return await call_metered(endpoint, request, protocol)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except Exception:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "the server failed to process the request")


class MeteredRoute(APIRoute):
    """An inference route: counted by final status and timed, with its errors mapped by `api_error`."""

    protocol = "http"  # the `protocol` label: "http" for /classify and /v1, see service/oip_rest.py

    def get_route_handler(self) -> Endpoint:
        handler = super().get_route_handler()

        async def metered(request: Request) -> Response:
            return await call_metered(handler, request, self.protocol)

        return metered


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can produce becomes the JSON error body; no stack trace ever leaves."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_option", validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = api_error(exc)
        assert error is not None
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        error = api_error(exc)
        if error is not None:
            return error_response(error.status, error.code, error.message, error.headers)
        log.exception("unhandled error")
        return error_response(500, "internal_error", "the server failed to process the request")


class BodyLimitMiddleware:
    """Answer 413 to bodies over `limit` bytes: by Content-Length up front, or as they stream in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        message = f"the request body exceeds {self.limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if scope["path"].startswith("/v2/"):  # the Open Inference Protocol's error body
                await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
            else:
                await error_response(413, "body_too_large", message)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, "body_too_large", message)
            return msg

        await self.app(scope, limited, send)
