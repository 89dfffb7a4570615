"""The Open Inference Protocol over REST (same port as /classify): JSON and the binary tensor data extension.

A request body is JSON, or — with `Inference-Header-Content-Length: L` — L bytes of JSON followed by
the binary data of the inputs whose parameters carry `binary_data_size`, in order. `L = 0` is the
raw-binary form: the whole body is one encoded image. In JSON, a BYTES element (an encoded image)
is a base64 string. Outputs go back as JSON, or as binary for those with `binary_data: true` (or all
of them with the request parameter `binary_data_output: true`). Errors are the protocol's
`{"error": "<message>"}` plus our stable `"code"`, with 400 for every bad request.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from service.dataplane import DataPlane, Protocol
from service.errors import ServiceError, v2_status
from service.loop_lag import read_at
from service.options import budget_ms
from service.protocols import v2
from service.protocols.routes import Route
from service.protocols.v2 import InferCall, InputTensor, OutputTensor, RequestedOutput, bad_request
from service.served import Served

HEADER_LENGTH = "inference-header-content-length"
PROTOCOL = Protocol("v2-rest", v2_status)  # the `protocol` label of anytime_requests_total


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
    """The protocol's error body, and our stable error code."""

    error: str
    code: str


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


class RepositoryIndexRequest(BaseModel):
    repository_name: str = ""
    ready: bool = False


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: str
    reason: str


class ModelControlRequest(BaseModel):
    parameters: dict[str, Any] = {}


def _body(raw: bytes, model: type[BaseModel]) -> Any:
    """The JSON body as `model` (an empty body is the defaults); 400 when it is not."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        err = exc.errors()[0]
        raise bad_request(f"request: {'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}") from None


async def repository_index(request: Request) -> Response:
    """Triton's repository index: each model of the store (and each served) with its version and state
    (READY, or UNAVAILABLE and why); `{"ready": true}` lists the ready ones only."""
    body = _body(await request.body(), RepositoryIndexRequest)
    return JSONResponse(await v2.repository_index(plane(request), body.ready))


async def load_model(request: Request) -> Response:
    """Load the model from the store (its newest or pinned version), or roll it to a newer one; needs
    ANYTIME_MODEL_CONTROL=explicit. A load that fails leaves the version serving."""
    body = _body(await request.body(), ModelControlRequest)
    await v2.control(plane(request), "load", request.path_params["name"], body.parameters)
    return Response(status_code=200)


async def unload_model(request: Request) -> Response:
    """Unload the model once the requests it accepted are answered; needs ANYTIME_MODEL_CONTROL=explicit."""
    body = _body(await request.body(), ModelControlRequest)
    await v2.control(plane(request), "unload", request.path_params["name"], body.parameters)
    return Response(status_code=200)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ProtocolError} for s in statuses}


def render(error: ServiceError) -> Response:
    """`{"error": message, "code": code}` with the protocol's status (400 for every bad request)."""
    body = {"error": error.message, "code": error.code}
    return JSONResponse(body, status_code=v2_status(error.kind), headers=error.headers())


def plane(request: Request) -> DataPlane:
    return request.app.state.plane


def _bytes_elements(tensor: RestTensor, raw: bytes | None, count: int) -> list[bytes]:
    if raw is not None:
        return v2.split_bytes(tensor.name, raw, count)
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
    count = v2.element_count(tensor.name, tensor.shape)
    if raw is None and tensor.data is None:
        raise bad_request(f"input {tensor.name!r} has neither data nor binary_data_size")
    if tensor.datatype == "BYTES":
        return InputTensor(tensor.name, "BYTES", tensor.shape, elements=_bytes_elements(tensor, raw, count))
    if tensor.datatype == "FP32":
        return InputTensor(
            tensor.name, "FP32", tensor.shape, array=v2.fp32_array(tensor.name, tensor.shape, tensor.data, raw)
        )
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
            return InferCall(name, version, [InputTensor(v2.IMAGE_INPUT, "BYTES", [1], elements=[body])], [])
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


def _classification(out: RestOutput) -> Any:
    return out.parameters.get("classification")  # validated with the other options (v2.outputs_wanted)


def encode(call: InferCall, model: Served, outputs: list[OutputTensor]) -> Response:
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
    return Response(
        text + b"".join(chunks), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(text))}
    )


async def infer(request: Request) -> Response:
    """Inference with the model (and version) the path names; JSON or binary tensor data."""
    received = read_at(request.scope)
    dp = plane(request)
    name, version = request.path_params["name"], request.path_params.get("version")
    async with dp.call(PROTOCOL, name, version) as model:
        call = parse(await request.body(), request.headers.get(HEADER_LENGTH), name, version)
        header = budget_ms("X-Deadline-Ms", request.headers.get("x-deadline-ms"))
        budgets = v2.budgets(call.parameters, header, None)
        outputs = await v2.execute(call, model, dp, received, budgets, max_items=dp.settings.max_files)
        return encode(call, model, outputs)


async def server_metadata(request: Request) -> Response:
    """Server metadata: name, version, extensions."""
    return JSONResponse(v2.server_metadata())


async def live(request: Request) -> Response:
    """`{"live": true}` while the process answers."""
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    """200 with `{"ready": true}` once every model is warmed up; 503 before that and while draining."""
    try:
        plane(request).check_ready()
    except ServiceError:
        return JSONResponse({"ready": False}, status_code=503)
    return JSONResponse({"ready": True})


def _model(request: Request) -> Served:
    return plane(request).model(request.path_params["name"], request.path_params.get("version"))


async def metadata(request: Request) -> Response:
    """Model metadata: platform, versions, inputs and outputs with datatype and shape (-1: variable)."""
    return JSONResponse(v2.model_metadata(_model(request)))


async def model_ready(request: Request) -> Response:
    """200 when the model (version) is served and ready; 404 when it is not served."""
    model = _model(request)
    return JSONResponse({"name": model.name, "ready": model.engine.alive})


async def config(request: Request) -> Response:
    """Triton's model configuration: batching, inputs and outputs with dims (no batch dimension), and
    Anytime's exits, thresholds, FLOPs fractions and accuracies as `parameters`."""
    return JSONResponse(v2.model_config(_model(request)))


async def statistics(request: Request) -> Response:
    """Triton's inference statistics: counts and cumulative times by phase, batch statistics, and per-exit
    counts in `exit_stats` (Anytime's own); from the same samples as /metrics."""
    params = request.path_params
    return JSONResponse(v2.statistics(plane(request), params.get("name"), params.get("version")))


_TAGS = ["Open Inference Protocol"]
_INFER_DOC: dict[str, Any] = {
    "responses": {200: {"model": RestInferResponse}, **_errors(400, 404, 413, 500, 503, 504)},
    "openapi_extra": {
        "requestBody": {
            "content": {
                "application/json": {"schema": RestInferRequest.model_json_schema()},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            }
        }
    },
    "tags": _TAGS,
}
_META = {"response_model": ModelMetadata, "responses": _errors(404, 503), "tags": _TAGS}
_READY = {"responses": _errors(404, 503), "tags": _TAGS}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}}}


_REPOSITORY_INDEX = {
    "responses": {200: {"model": list[RepositoryModel]}, **_errors(400, 503)},
    "openapi_extra": _json_body(RepositoryIndexRequest),
    "tags": _TAGS,
}
_CONTROL = {"responses": _errors(400, 404, 409, 503), "openapi_extra": _json_body(ModelControlRequest), "tags": _TAGS}
ROUTES = [
    Route("/v2/models/{name}/infer", infer, render, methods=("POST",), hot=True, doc=_INFER_DOC),
    Route("/v2/models/{name}/versions/{version}/infer", infer, render, methods=("POST",), hot=True, doc=_INFER_DOC),
    Route("/v2", server_metadata, render, doc={"response_model": ServerMetadata, "tags": _TAGS}),
    Route("/v2/health/live", live, render, doc={"tags": _TAGS}),
    Route("/v2/health/ready", ready, render, doc={"responses": {503: {"description": "not ready"}}, "tags": _TAGS}),
    Route("/v2/repository/index", repository_index, render, methods=("POST",), doc=_REPOSITORY_INDEX),
    Route("/v2/repository/models/{name}/load", load_model, render, methods=("POST",), doc=_CONTROL),
    Route("/v2/repository/models/{name}/unload", unload_model, render, methods=("POST",), doc=_CONTROL),
    Route("/v2/models/stats", statistics, render, doc=_READY),
    Route("/v2/models/{name}/stats", statistics, render, doc=_READY),
    Route("/v2/models/{name}/versions/{version}/stats", statistics, render, doc=_READY),
    Route("/v2/models/{name}/config", config, render, doc=_READY),
    Route("/v2/models/{name}/versions/{version}/config", config, render, doc=_READY),
    Route("/v2/models/{name}", metadata, render, doc=_META),
    Route("/v2/models/{name}/versions/{version}", metadata, render, doc=_META),
    Route("/v2/models/{name}/ready", model_ready, render, doc=_READY),
    Route("/v2/models/{name}/versions/{version}/ready", model_ready, render, doc=_READY),
]
