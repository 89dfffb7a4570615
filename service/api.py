"""HTTP routes: /classify, /classify/batch, /healthz, /readyz, /v1/model, /metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.engine import Answer, DeadlineUnreachable, EngineFailure, EngineStopped, Job, QueueFull
from service.errors import ApiError
from service.images import ImageRejected, decode_image
from service.schemas import (
    BatchClassification,
    Classification,
    ClassifyJSON,
    ClassifyOptions,
    ErrorBody,
    ModelView,
    TopK,
)
from service.state import ServiceState

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 413, 415, 422, 500, 503, 504)}
_OPTION_PARAMS = [
    {"name": "threshold", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 1}},
    {"name": "deadline_ms", "in": "query", "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600000}},
    {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "max_exit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {"name": "X-Deadline-Ms", "in": "header", "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600000}},
]
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


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


def _options(request: Request, extra: dict[str, Any] | None = None) -> ClassifyOptions:
    """Options from the query string, then the JSON body, then X-Deadline-Ms; 422 when invalid."""
    values: dict[str, Any] = {k: v for k, v in request.query_params.items() if k in ClassifyOptions.model_fields}
    unknown = [k for k in request.query_params if k not in ClassifyOptions.model_fields]
    if unknown:
        raise ApiError(422, "invalid_option", f"unknown option(s): {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in (extra or {}).items() if v is not None})
    header = request.headers.get("x-deadline-ms")
    if header is not None and "deadline_ms" not in values:
        values["deadline_ms"] = header
    try:
        return ClassifyOptions.model_validate(values)
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ApiError(422, "invalid_option", msg) from None


async def _read_single_image(request: Request) -> tuple[bytes, ClassifyOptions]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_file", "multipart body needs the image in a field named 'file'")
        return await upload.read(), _options(request)
    if ctype.startswith("image/"):
        return await request.body(), _options(request)
    if ctype == "application/json":
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
            raise ApiError(422, "invalid_option", "JSON body needs 'image': a base64 string")
        extra = {k: v for k, v in payload.items() if k != "image"}
        unknown = sorted(set(extra) - set(ClassifyOptions.model_fields))
        if unknown:
            raise ApiError(422, "invalid_option", f"unknown field(s): {', '.join(unknown)}")
        try:
            data = base64.b64decode(payload["image"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_base64", "'image' is not valid base64") from None
        return data, _options(request, extra)
    accepted = "multipart/form-data (field 'file'), image/*, or application/json"
    raise ApiError(415, "unsupported_media_type", f"content type {ctype or 'none'!r} not accepted; send {accepted}")


async def _decode(state: ServiceState, data: bytes) -> Any:
    try:
        return await run_in_threadpool(decode_image, data, state.input_spec, state.transform, state.max_pixels)
    except ImageRejected as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None


async def _classify(state: ServiceState, x: Any, opts: ClassifyOptions, received: float) -> Classification:
    if opts.max_exit is not None and opts.max_exit > state.engine.num_exits:
        raise ApiError(422, "invalid_option", f"max_exit: the model has {state.engine.num_exits} exits")
    deadline_ms = opts.deadline_ms if opts.deadline_ms is not None else state.settings.default_deadline_ms
    deadline = received + deadline_ms / 1e3 if deadline_ms is not None else None
    job = Job(x, opts.threshold, opts.max_exit, deadline, min(opts.top_k, len(state.classes)))
    try:
        future = state.engine.submit(job)
    except QueueFull:
        raise ApiError(503, "overloaded", "the server is at capacity; retry shortly", {"Retry-After": "1"}) from None
    except EngineStopped:
        raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"}) from None
    try:
        answer: Answer = await asyncio.wait_for(future, timeout=state.settings.request_timeout_s)
    except DeadlineUnreachable as exc:
        state.metrics.deadlines.labels(outcome="rejected").inc()
        raise ApiError(504, "deadline_exceeded", str(exc)) from None
    except TimeoutError:
        raise ApiError(504, "timeout", f"no answer within {state.settings.request_timeout_s} s") from None
    except EngineFailure as exc:
        raise ApiError(500, "inference_failed", str(exc)) from None
    except EngineStopped:
        raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"}) from None
    elapsed = time.monotonic() - received
    state.record_answer(answer, elapsed, deadline)
    return Classification(
        label=state.classes[answer.index], index=answer.index, confidence=answer.confidence, exit=answer.exit,
        exits=state.engine.num_exits, reason=answer.reason.value,
        top_k=[TopK(label=state.classes[i], index=i, probability=p) for i, p in answer.top_k],
        latency_ms=elapsed * 1e3, queue_ms=answer.queue_s * 1e3, model=state.name, version=state.version,
    )  # fmt: skip


@router.post(
    "/classify", response_model=Classification, responses=_ERRORS,
    openapi_extra={"requestBody": _IMAGE_BODY, "parameters": _OPTION_PARAMS},
)  # fmt: skip
async def classify(request: Request, state: State) -> Classification:
    """Classify one image: multipart field `file`, a raw `image/*` body, or JSON `{"image": base64}`."""
    received = time.monotonic()
    with state.track_request() as track:
        state.require_ready()
        data, opts = await _read_single_image(request)
        x = await _decode(state, data)
        result = await _classify(state, x, opts, received)
        track.ok()
        return result


@router.post(
    "/classify/batch", response_model=BatchClassification, responses=_ERRORS,
    openapi_extra={"requestBody": _BATCH_BODY, "parameters": _OPTION_PARAMS},
)  # fmt: skip
async def classify_batch(request: Request, state: State) -> BatchClassification:
    """Classify several images (multipart field `files`, repeated); each is answered as by /classify."""
    received = time.monotonic()
    with state.track_request() as track:
        state.require_ready()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data with one 'files' field per image")
        limit = state.settings.max_files
        form = await request.form(max_files=limit + 1, max_fields=limit + 10)
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not uploads:
            raise ApiError(422, "missing_file", "multipart body needs images in fields named 'files'")
        if len(uploads) > limit:
            raise ApiError(413, "too_many_files", f"at most {limit} images per request")
        opts = _options(request)
        tensors = [await _decode(state, await u.read()) for u in uploads]
        results = await asyncio.gather(*(_classify(state, x, opts, received) for x in tensors))
        track.ok()
        return BatchClassification(results=list(results))


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(state: State) -> dict[str, str]:
    """Readiness: the model is loaded and warmed up, and the server is not draining."""
    state.require_ready()
    return {"status": "ready", "model": state.name, "version": state.version}


@router.get("/v1/model", response_model=ModelView)
async def model_info(state: State) -> ModelView:
    """The served artifact's public manifest: exits, thresholds, accuracies, input spec."""
    return state.model_view()


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    """Prometheus metrics (internal: do not expose to the internet)."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
