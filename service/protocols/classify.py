"""`POST /classify` and its relatives: the anytime API's own protocol.

An image comes as a multipart field `file`, a raw `image/*` body, or JSON `{"image": base64,
...options}`; options come in the query string or the JSON body (the body's win), budgets also
in X-Deadline-Ms (the earliest deadline wins: service/options.py). Errors are
`{"error": {"code", "message"}}` with the status of the error table (service/errors.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

from fastapi import Request, Response
from starlette.datastructures import QueryParams, UploadFile

from service.dataplane import WARMUP_HEADER, DataPlane, Protocol
from service.engine import Answer, DeadlineUnreachable, QueueFull
from service.errors import (
    INVALID_BASE64,
    INVALID_JSON,
    INVALID_OPTION,
    MISSING_FILE,
    TOO_MANY_ITEMS,
    UNSUPPORTED_MEDIA_TYPE,
    ServiceError,
    to_error,
)
from service.loop_lag import read_at
from service.options import NO_OPTIONS, InferenceOptions, OptionFields, budget_ms, option_fields
from service.protocols.routes import Route
from service.schemas import BatchClassification, Classification, ClassifyJSON, ErrorBody
from service.served import Served

PROTOCOL = Protocol("http", lambda kind: kind.status)
HEADER = "x-deadline-ms"
CHECKED = "anytime.checked"  # scope key: (received, options) of a request checked from its headers
_WARMUP = WARMUP_HEADER.encode()


def render(error: ServiceError) -> Response:
    """`{"error": {"code", "message"}}` with the error's status and headers."""
    return Response(error_json(error), error.status, error.headers(), media_type="application/json")


def error_json(error: ServiceError) -> bytes:
    """The body of `render(error)` (also written by service/protocols/early.py): the bytes of
    `json.dumps({"error": {"code": ..., "message": ...}}, ensure_ascii=False, separators=(",", ":"))`,
    formatted around the two escaped strings, since under overload every refusal renders one and
    `json.dumps` building its encoder cost a tenth of the event loop's time per refusal."""
    code, message = encode_basestring(error.code), encode_basestring(error.message)
    return f'{{"error":{{"code":{code},"message":{message}}}}}'.encode()


@dataclass(frozen=True, slots=True)
class HeadersCheck:
    """The check before decoding, made from a request's headers (`check_from_headers`)."""

    model: Served
    options: InferenceOptions
    refusal: ServiceError | None  # None: it passed (the endpoint takes `options` as checked: `CHECKED`)


def plane(request: Request) -> DataPlane:
    return request.app.state.plane


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def options_of(request: Request, body: dict[str, Any] | None = None) -> tuple[OptionFields, list[float | None]]:
    """The request's option fields (the JSON body's over the query string's) and its budgets (all of them:
    the earliest deadline wins)."""
    header = request.headers.get(HEADER)
    query = option_fields(dict(request.query_params)) if request.scope.get("query_string") else NO_OPTIONS
    return _merged(query, header, body)


def _merged(
    query: OptionFields, header: str | None, body: dict[str, Any] | None
) -> tuple[OptionFields, list[float | None]]:
    budgets = [query.deadline_ms, budget_ms("X-Deadline-Ms", header)]
    if body:
        given = option_fields(body)
        budgets.append(given.deadline_ms)
        merged = {**query.model_dump(exclude_unset=True), **given.model_dump(exclude_unset=True)}
        query = OptionFields.model_construct(**{**merged, "deadline_ms": None})
    return query, budgets


async def _read_json(request: Request) -> tuple[bytes, dict[str, Any]]:
    """JSON `{"image": base64, ...options}`: the image bytes and the options."""
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ServiceError("the body is not valid JSON", INVALID_JSON) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
        raise ServiceError("JSON body needs 'image': a base64 string", INVALID_OPTION)
    image = payload.pop("image")
    try:
        return base64.b64decode(image, validate=True), payload
    except (binascii.Error, ValueError):
        raise ServiceError("'image' is not valid base64", INVALID_BASE64) from None


async def _read_image(request: Request) -> tuple[bytes, dict[str, Any] | None]:
    """The image bytes of a /classify request in any of its three forms, and the JSON body's options."""
    ctype = _media_type(request)
    if ctype.startswith("image/"):
        return await request.body(), None
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ServiceError("multipart body needs the image in a field named 'file'", MISSING_FILE)
        return await upload.read(), None
    if ctype == "application/json":
        return await _read_json(request)
    accepted = "multipart/form-data (field 'file'), image/*, or application/json"
    raise ServiceError(f"content type {ctype or 'none'!r} not accepted; send {accepted}", UNSUPPORTED_MEDIA_TYPE)


def classification(model: Served, answer: Answer, received: float) -> dict[str, Any]:
    """One answer as the API's JSON object (schema: `Classification`)."""
    classes = model.classes
    body = {
        "label": classes[answer.index],
        "index": answer.index,
        "confidence": answer.confidence,
        "exit": answer.exit,
        "exits": model.num_exits,
        "reason": answer.reason.value,
        "top_k": [{"label": classes[i], "index": i, "probability": p} for i, p in answer.top_k],
        "latency_ms": (time.monotonic() - received) * 1e3,
        "queue_ms": answer.queue_s * 1e3,
        "model": model.name,
        "version": model.version,
    }
    if answer.probabilities is not None:
        body["probabilities"] = answer.probabilities
    return body


def _json(body: dict[str, Any]) -> Response:
    """The answer serialised once (no second validation pass over what the engine produced)."""
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


def check_from_headers(
    dp: DataPlane, path: bytes, query_string: bytes, headers: list[tuple[bytes, bytes]], received: float
) -> HeadersCheck | None:
    """The check before decoding of a `POST /classify` with a raw `image/*` body, made from its path, query
    and headers alone (service/protocols/early.py); None: not checked here (another route or body form,
    options to validate, a server not serving: the endpoint answers it). With a raw body every option
    is in the query and the headers, so this is the endpoint's own check, made before the body is read."""
    if path != b"/classify" or dp.draining:
        return None
    header, media, length = None, b"", None
    for name, value in headers:
        if name == b"content-type":
            media = value
        elif name == b"x-deadline-ms":
            header = value.decode("latin-1")
        elif name == b"content-length":
            length = value
        elif name == _WARMUP:
            return None  # the server's own warm-up is served, and not counted
    if not media.lower().lstrip().startswith(b"image/"):
        return None
    if length is not None and (not length.isdigit() or int(length) > dp.settings.max_body_bytes):
        return None  # the body limit answers it
    try:
        dp.check_serving()
        query = option_fields(dict(QueryParams(query_string))) if query_string else NO_OPTIONS
        fields, budgets = _merged(query, header, None)
        model = dp.registry.get()
        if not model.engine.alive:
            return None
        options = dp.options(received, fields, budgets)
        dp.precheck(model, options)
    except (DeadlineUnreachable, QueueFull) as refused:
        return HeadersCheck(model, options, to_error(refused))  # kept without its traceback
    except ServiceError:
        return None  # the usual path answers it, with its own error
    return HeadersCheck(model, options, None)


async def classify(request: Request) -> Response:
    """Classify one image with the model the path names (the default model on /classify): multipart field
    `file`, a raw `image/*` body, or JSON `{"image": base64, ...options}`."""
    received = read_at(request.scope)
    dp = plane(request)
    name, version = request.path_params.get("name"), request.path_params.get("version")
    checked: tuple[float, InferenceOptions] | None = request.scope.get(CHECKED)
    async with dp.call(PROTOCOL, name, version) as model:
        data, body = await _read_image(request)
        if checked is not None:  # the same check, made as the headers came (`check_from_headers`)
            received, options = checked
        else:
            fields, budgets = options_of(request, body)
            options = dp.options(received, fields, budgets)
            dp.precheck(model, options)  # under overload, refusing before decoding is what keeps up
        x = await model.prepare(data)
        answer = await dp.infer(model, x, options)
        return _json(classification(model, answer, received))


async def classify_batch(request: Request) -> Response:
    """Classify several images (multipart field `files`, repeated) with the default model."""
    received = read_at(request.scope)
    dp = plane(request)
    async with dp.call(PROTOCOL) as model:
        if _media_type(request) != "multipart/form-data":
            raise ServiceError("send multipart/form-data with one 'files' field per image", UNSUPPORTED_MEDIA_TYPE)
        limit = dp.settings.max_files
        form = await request.form(max_files=limit + 1, max_fields=limit + 10)
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not uploads:
            raise ServiceError("multipart body needs images in fields named 'files'", MISSING_FILE)
        if len(uploads) > limit:
            raise ServiceError(f"at most {limit} images per request", TOO_MANY_ITEMS)
        fields, budgets = options_of(request)
        options = dp.options(received, fields, budgets)
        inputs = [await model.prepare(await u.read()) for u in uploads]  # every image valid before any compute
        answers = await asyncio.gather(*(dp.infer(model, x, options) for x in inputs))
        return _json({"results": [classification(model, a, received) for a in answers]})


_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 404, 413, 415, 422, 500, 503, 504)}
_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": ClassifyJSON.model_json_schema()},
    },
}
_BATCH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["files"],
            }
        }
    },
}


def _option_parameters() -> tuple[dict[str, Any], ...]:
    """OpenAPI parameters generated from `OptionFields`, the model that also validates them."""
    schema = OptionFields.model_json_schema()["properties"]
    params = [{"name": name, "in": "query", "required": False, "schema": s} for name, s in schema.items()]
    header = {"name": "X-Deadline-Ms", "in": "header", "required": False, "schema": schema["deadline_ms"]}
    return (*params, header)


_PARAMETERS = _option_parameters()
_CLASSIFY = {
    "responses": {200: {"model": Classification}, **_ERRORS},
    "openapi_extra": {"requestBody": _IMAGE_BODY},
    "tags": ["Classify"],
}
_BATCH = {
    "responses": {200: {"model": BatchClassification}, **_ERRORS},
    "openapi_extra": {"requestBody": _BATCH_BODY},
    "tags": ["Classify"],
}


def _classify_route(path: str) -> Route:
    return Route(path, classify, render, methods=("POST",), hot=True, doc=_CLASSIFY, parameters=_PARAMETERS)


ROUTES = [
    _classify_route("/classify"),
    _classify_route("/v1/models/{name}/classify"),
    _classify_route("/v1/models/{name}/versions/{version}/classify"),
    Route("/classify/batch", classify_batch, render, methods=("POST",), doc=_BATCH, parameters=_PARAMETERS),
]
