"""HTTP routes: /classify, /classify/batch, /healthz, /readyz, /v1/model, /metrics.

Routes parse, call the served model, and write the answer; errors are mapped to HTTP in
`service/errors.py`, and the inference routes are counted by `MeteredRoute`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.routing import Route

from models.artifact import list_versions
from service.engine import Answer
from service.errors import ApiError, MeteredRoute, validation_message
from service.schemas import (
    BatchClassification,
    Classification,
    ClassifyJSON,
    ClassifyOptions,
    ErrorBody,
    ModelList,
    ModelView,
    ServedSummary,
)
from service.served import ServedModel
from service.state import ServiceState

router = APIRouter(route_class=MeteredRoute)  # the inference routes
meta = APIRouter()  # health, readiness, the model's description, metrics

_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 413, 415, 422, 500, 503, 504)}
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


def _option_parameters() -> list[dict[str, Any]]:
    """OpenAPI parameters generated from `ClassifyOptions`, the model that also validates them."""
    schema = ClassifyOptions.model_json_schema()["properties"]
    params = [{"name": name, "in": "query", "required": False, "schema": s} for name, s in schema.items()]
    return [*params, {"name": "X-Deadline-Ms", "in": "header", "required": False, "schema": schema["deadline_ms"]}]


_PARAMETERS = _option_parameters()
_NO_OPTIONS = ClassifyOptions()


def service(request: Request) -> ServiceState:
    return request.app.state.service


def _options(request: Request) -> ClassifyOptions:
    """Options from the query string, X-Deadline-Ms when the query names no deadline; 422 when invalid.

    Validated by the one pydantic model (about a microsecond); a request without options shares
    one default instance. FastAPI's query parameter models cost 70 µs a request here (py-spy).
    """
    header = request.headers.get("x-deadline-ms")
    if not request.scope.get("query_string") and header is None:
        return _NO_OPTIONS
    values: dict[str, Any] = dict(request.query_params)
    if header is not None:
        values.setdefault("deadline_ms", header)
    try:
        return ClassifyOptions.model_validate(values)
    except ValidationError as exc:
        raise ApiError(422, "invalid_option", validation_message(list(exc.errors()))) from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_json(request: Request, query: ClassifyOptions) -> tuple[bytes, ClassifyOptions]:
    """JSON `{"image": base64, ...options}`; options in the body override the query string's."""
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
        raise ApiError(422, "invalid_option", "JSON body needs 'image': a base64 string")
    try:
        body = ClassifyJSON.model_validate({**query.model_dump(exclude_unset=True), **payload})
    except ValidationError as exc:
        raise ApiError(422, "invalid_option", validation_message(list(exc.errors()))) from None
    try:
        data = base64.b64decode(body.image, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", "'image' is not valid base64") from None
    return data, body


async def _read_image(request: Request, query: ClassifyOptions) -> tuple[bytes, ClassifyOptions]:
    """The image bytes and options of a /classify request, in any of its three forms."""
    ctype = _media_type(request)
    if ctype.startswith("image/"):
        return await request.body(), query
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_file", "multipart body needs the image in a field named 'file'")
        return await upload.read(), query
    if ctype == "application/json":
        return await _read_json(request, query)
    accepted = "multipart/form-data (field 'file'), image/*, or application/json"
    raise ApiError(415, "unsupported_media_type", f"content type {ctype or 'none'!r} not accepted; send {accepted}")


def _classification(model: ServedModel, answer: Answer, received: float) -> dict[str, Any]:
    classes = model.classes
    return {
        "label": classes[answer.index], "index": answer.index, "confidence": answer.confidence,
        "exit": answer.exit, "exits": model.num_exits, "reason": answer.reason.value,
        "top_k": [{"label": classes[i], "index": i, "probability": p} for i, p in answer.top_k],
        "latency_ms": (time.monotonic() - received) * 1e3, "queue_ms": answer.queue_s * 1e3,
        "model": model.name, "version": model.version,
    }  # fmt: skip


def _json(body: dict[str, Any]) -> Response:
    """The answer serialised once (no second validation pass over what the engine produced)."""
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


async def _classify(model: ServedModel, x: Any, opts: ClassifyOptions, received: float) -> dict[str, Any]:
    answer = await model.infer(
        x, received=received, threshold=opts.threshold, max_exit=opts.max_exit, deadline_ms=opts.deadline_ms,
        top_k=opts.top_k,
    )  # fmt: skip
    return _classification(model, answer, received)


_CLASSIFY_DOC = {
    "response_model": None,
    "responses": {200: {"model": Classification}, **_ERRORS, 404: {"model": ErrorBody}},
    "openapi_extra": {"requestBody": _IMAGE_BODY, "parameters": _PARAMETERS},
}


async def classify(request: Request) -> Response:
    """Classify one image with the model the path names (the default model on /classify)."""
    received = time.monotonic()
    name, version = request.path_params.get("name"), request.path_params.get("version")
    async with service(request).lease(request, name, version) as model:
        data, opts = await _read_image(request, _options(request))
        x = await model.prepare(data)
        return _json(await _classify(model, x, opts, received))


@router.post("/classify", **_CLASSIFY_DOC)
async def classify_default(request: Request) -> Response:
    """Classify one image with the default model: multipart field `file`, a raw `image/*` body, or JSON
    `{"image": base64}`."""
    return await classify(request)


@router.post("/v1/models/{name}/classify", **_CLASSIFY_DOC)
async def classify_named(request: Request, name: str) -> Response:
    """Classify one image with the serving version of model `name`."""
    return await classify(request)


@router.post("/v1/models/{name}/versions/{version}/classify", **_CLASSIFY_DOC)
async def classify_version(request: Request, name: str, version: str) -> Response:
    """Classify one image with version `version` of model `name` (404 unless it is the one serving)."""
    return await classify(request)


@router.post(
    "/classify/batch", response_model=None, responses={200: {"model": BatchClassification}, **_ERRORS},
    openapi_extra={"requestBody": _BATCH_BODY, "parameters": _PARAMETERS},
)  # fmt: skip
async def classify_batch(request: Request) -> Response:
    """Classify several images (multipart field `files`, repeated) with the default model."""
    received = time.monotonic()
    async with service(request).lease(request) as model:
        if _media_type(request) != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data with one 'files' field per image")
        limit = service(request).settings.max_files
        form = await request.form(max_files=limit + 1, max_fields=limit + 10)
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not uploads:
            raise ApiError(422, "missing_file", "multipart body needs images in fields named 'files'")
        if len(uploads) > limit:
            raise ApiError(413, "too_many_files", f"at most {limit} images per request")
        opts = _options(request)
        inputs = [await model.prepare(await u.read()) for u in uploads]  # every image valid before any compute
        results = await asyncio.gather(*(_classify(model, x, opts, received) for x in inputs))
        return _json({"results": results})


@meta.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@meta.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> dict[str, Any]:
    """Readiness: the models are loaded and warmed up, and the server is not draining."""
    state = service(request)
    state.check_ready()
    default = state.registry.get()
    served = {m.name: m.version for m in state.registry.served()}
    return {"status": "ready", "model": default.name, "version": default.version, "models": served}


def _view(request: Request, name: str | None = None, version: str | None = None) -> ModelView:
    return service(request).registry.get(name, version).view()  # ModelNotFound: 404 (service/errors.py)


@meta.get("/v1/model", response_model=ModelView, responses={404: {"model": ErrorBody}})
async def model_info(request: Request) -> ModelView:
    """The default model's public manifest: exits, thresholds, accuracies, input spec."""
    return _view(request)


@meta.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """Every served model: the version it serves and the versions in the store."""
    registry = service(request).registry
    return ModelList(
        default=registry.default,
        models=[
            ServedSummary(
                name=m.name, version=m.version, device=m.device, exits=m.num_exits, classes=len(m.classes),
                versions=list_versions(registry.store, m.name), default=m.name == registry.default,
            )
            for m in registry.served()
        ],
    )  # fmt: skip


@meta.get("/v1/models/{name}", response_model=ModelView, responses={404: {"model": ErrorBody}})
@meta.get("/v1/models/{name}/model", response_model=ModelView, responses={404: {"model": ErrorBody}})
async def model_named(request: Request, name: str) -> ModelView:
    """Model `name`'s public manifest (its serving version)."""
    return _view(request, name)


@meta.get("/v1/models/{name}/versions/{version}", response_model=ModelView, responses={404: {"model": ErrorBody}})
@meta.get("/v1/models/{name}/versions/{version}/model", response_model=ModelView, responses={404: {"model": ErrorBody}})
async def model_version(request: Request, name: str, version: str) -> ModelView:
    """The public manifest of version `version` of model `name`, when it is the one serving."""
    return _view(request, name, version)


@meta.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (internal: do not expose to the internet)."""
    return Response(generate_latest(service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# Served by the front door (service/frontdoor.py) without FastAPI's layers; FastAPI documents them.
HOT_ROUTES = [
    (Route(path, classify, methods=["POST"]), "http")
    for path in ("/classify", "/v1/models/{name}/classify", "/v1/models/{name}/versions/{version}/classify")
]
