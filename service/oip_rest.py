"""The Open Inference Protocol over REST (same port as /classify): JSON and the binary tensor data extension.

A request body is JSON, or — with `Inference-Header-Content-Length: L` — L bytes of JSON followed by
the binary data of the inputs whose parameters carry `binary_data_size`, in order. `L = 0` is the
raw-binary form: the whole body is one encoded image. In JSON, a BYTES element (an encoded image)
is a base64 string. Outputs go back as JSON, or as binary for those with `binary_data: true` (or all
of them with the request parameter `binary_data_output: true`). Errors are `{"error": "..."}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.routing import Route

from service import oip
from service.errors import ApiError, MeteredRoute, api_error
from service.oip import InferCall, InputTensor, OutputTensor, RequestedOutput, bad_request
from service.served import ServedModel
from service.state import ServiceState

log = logging.getLogger("anytime.oip")
HEADER_LENGTH = "inference-header-content-length"
PROTOCOL = "v2-rest"  # the `protocol` label of anytime_requests_total


class OipRoute(MeteredRoute):
    protocol = PROTOCOL


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
infer_router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"], route_class=OipRoute)


class RestTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class RestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class RestInferRequest(BaseModel):
    """The JSON part of an inference request."""

    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[RestTensor] = Field(min_length=1)
    outputs: list[RestOutput] = []


class ProtocolError(BaseModel):
    """The protocol's error body."""

    error: str


class TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RestOutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = {}
    data: list[Any] | None = None


class RestInferResponse(BaseModel):
    """The JSON part of an inference response (binary outputs follow it when requested)."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[RestOutputTensor]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ProtocolError} for s in statuses}


def error(exc: BaseException) -> JSONResponse:
    """The protocol's error body `{"error": "..."}` with the status the exception stands for."""
    mapped = api_error(exc)
    if mapped is None:
        log.exception("unhandled error", exc_info=exc)
        mapped = ApiError(500, "internal_error", "the server failed to process the request")
    return JSONResponse({"error": mapped.message}, status_code=mapped.status, headers=mapped.headers)


def service(request: Request) -> ServiceState:
    return request.app.state.service


def _bytes_elements(tensor: RestTensor, raw: bytes | None, count: int) -> list[bytes]:
    if raw is not None:
        return oip.split_bytes(tensor.name, raw, count)
    data = tensor.data
    while isinstance(data, list) and data and isinstance(data[0], list):  # [[b64], [b64]] for shape [N, 1]
        data = [v for row in data for v in row]
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        raise bad_request(f"input {tensor.name!r}: JSON data of a BYTES tensor must be base64 strings")
    if len(data) != count:
        raise bad_request(f"input {tensor.name!r}: shape {tensor.shape} needs {count} elements, data has {len(data)}")
    try:
        return [base64.b64decode(v, validate=True) for v in data]
    except (binascii.Error, ValueError):
        raise bad_request(f"input {tensor.name!r}: an element is not valid base64") from None


def _input(tensor: RestTensor, raw: bytes | None) -> InputTensor:
    count = oip.element_count(tensor.name, tensor.shape)
    if raw is None and tensor.data is None:
        raise bad_request(f"input {tensor.name!r} has neither data nor binary_data_size")
    if tensor.datatype == "BYTES":
        return InputTensor(tensor.name, "BYTES", tensor.shape, elements=_bytes_elements(tensor, raw, count))
    if tensor.datatype == "FP32":
        return InputTensor(tensor.name, "FP32", tensor.shape, array=oip.fp32_array(tensor.name, tensor.shape,
                                                                                    tensor.data, raw))  # fmt: skip
    return InputTensor(tensor.name, tensor.datatype, tensor.shape)  # check_input names the wrong datatype


def parse(body: bytes, header_length: str | None, name: str, version: str | None) -> InferCall:
    """An InferCall from a REST body, JSON or with the binary extension."""
    if header_length is not None:
        if not header_length.isdigit():
            raise bad_request(f"Inference-Header-Content-Length must be a non-negative integer, got {header_length!r}")
        length = int(header_length)
        if length > len(body):
            raise bad_request(f"Inference-Header-Content-Length is {length}; the body has only {len(body)} bytes")
        if length == 0:  # raw binary: the body is one encoded image
            return InferCall(name, version, [InputTensor(oip.IMAGE_INPUT, "BYTES", [1], elements=[body])], [])
        body, binary = body[:length], body[length:]
    else:
        binary = b""
    try:
        request = RestInferRequest.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("the inference request is not valid JSON") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise bad_request(f"inference request: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    inputs, pos = [], 0
    for tensor in request.inputs:
        size = tensor.parameters.get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or pos + size > len(binary):
                raise bad_request(f"input {tensor.name!r}: binary_data_size {size!r} does not fit the binary data")
            raw, pos = binary[pos : pos + size], pos + size
        inputs.append(_input(tensor, raw))
    if pos != len(binary):
        raise bad_request(f"{len(binary) - pos} bytes of binary data belong to no input")
    all_binary = request.parameters.get("binary_data_output") is True
    outputs = [
        RequestedOutput(o.name, _classification(o), all_binary or o.parameters.get("binary_data") is True)
        for o in request.outputs
    ]
    return InferCall(name, version, inputs, outputs, request.parameters, request.id)


def _classification(out: RestOutput) -> int | None:
    k = out.parameters.get("classification")
    if k is None:
        return None
    if not isinstance(k, int) or isinstance(k, bool):
        raise bad_request(f"output {out.name!r}: classification must be an integer, got {k!r}")
    return k


def encode(call: InferCall, model: ServedModel, outputs: list[OutputTensor]) -> Response:
    """The response: JSON, or JSON then the binary outputs with Inference-Header-Content-Length."""
    entries, chunks = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.binary:
            raw = out.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = out.json_data()
        entries.append(entry)
    head: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": entries}
    if call.id is not None:
        head["id"] = call.id
    text = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(text))})  # fmt: skip


def _header_deadline(request: Request) -> float | None:
    value = request.headers.get("x-deadline-ms")
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        raise ApiError(422, "invalid_option", f"X-Deadline-Ms must be a number, got {value!r}") from None
    if not 0 < ms <= 3_600_000:
        raise ApiError(422, "invalid_option", "X-Deadline-Ms must be in (0, 3600000]")
    return ms


async def infer(request: Request) -> Response:
    """POST /v2/models/{name}[/versions/{version}]/infer."""
    received = time.monotonic()
    name, version = request.path_params["name"], request.path_params.get("version")
    state = service(request)
    try:
        async with state.lease(request, name, version) as model:
            call = parse(await request.body(), request.headers.get(HEADER_LENGTH), name, version)
            outputs = await oip.execute(
                call, model, received, _header_deadline(request), max_items=state.settings.max_files
            )
            return encode(call, model, outputs)
    except Exception as exc:
        return error(exc)


_INFER_DOC: dict[str, Any] = {
    "response_model": None,
    "responses": {200: {"model": RestInferResponse}, **_errors(400, 404, 413, 415, 422, 500, 503, 504)},
    "openapi_extra": {"requestBody": {"content": {
        "application/json": {"schema": RestInferRequest.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }}},
}  # fmt: skip


@infer_router.post("/models/{name}/infer", **_INFER_DOC)
async def infer_model(request: Request, name: str) -> Response:
    """Inference with the serving version of `name`; JSON or binary tensor data."""
    return await infer(request)


@infer_router.post("/models/{name}/versions/{version}/infer", **_INFER_DOC)
async def infer_version(request: Request, name: str, version: str) -> Response:
    """Inference with version `version` of `name` (404 unless it is the one serving)."""
    return await infer(request)


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> dict[str, Any]:
    """Server metadata: name, version, extensions."""
    return oip.server_metadata()


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", responses={503: {"description": "not ready or draining"}})
async def ready(request: Request) -> Response:
    """200 with `{"ready": true}` once every model is warmed up; 503 before that and while draining."""
    state = service(request)
    ok = state.ready and not state.draining
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def _model(request: Request, name: str, version: str | None) -> ServedModel:
    state = service(request)
    state.check_ready()
    return state.registry.get(name, version)


async def _metadata(request: Request, name: str, version: str | None) -> Response:
    try:
        return JSONResponse(oip.model_metadata(_model(request, name, version)))
    except Exception as exc:
        return error(exc)


async def _ready(request: Request, name: str, version: str | None) -> Response:
    try:
        model = _model(request, name, version)
        return JSONResponse({"name": model.name, "ready": model.engine.alive})
    except Exception as exc:
        return error(exc)


@router.get("/models/{name}", response_model=ModelMetadata, responses=_errors(404, 503))
async def metadata(request: Request, name: str) -> Response:
    """Model metadata: platform, versions, inputs and outputs with datatype and shape (-1: variable)."""
    return await _metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=_errors(404, 503))
async def metadata_version(request: Request, name: str, version: str) -> Response:
    """Metadata of version `version` of `name` (404 unless it is the one serving)."""
    return await _metadata(request, name, version)


@router.get("/models/{name}/ready", responses=_errors(404, 503))
async def model_ready(request: Request, name: str) -> Response:
    """200 when the model is served and ready; 404 when it is not served."""
    return await _ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=_errors(404, 503))
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    """200 when version `version` of `name` is served and ready; 404 otherwise."""
    return await _ready(request, name, version)


# Served by the front door without FastAPI's layers; FastAPI documents them.
HOT_ROUTES = [
    (Route(path, infer, methods=["POST"]), PROTOCOL)
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
]
