"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, in the server's process.

The six core RPCs (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer)
and Triton's ModelConfig, ModelStatistics and repository RPCs on grpc.aio, on the same event loop and engines as HTTP,
listening on ANYTIME_HOST:ANYTIME_GRPC_PORT. The message and service classes are the generated
modules `tritonclient[grpc]` ships (Triton's service is the same `inference.GRPCInferenceService`,
a superset of KServe's; the other RPCs answer UNIMPLEMENTED with a sentence). The call's gRPC
deadline is a latency budget like X-Deadline-Ms. Errors are the
error table's gRPC codes (service/errors.py) with the message; while draining (service/drain.py)
ServerReady says false, and once HTTP has closed its listener new calls get UNAVAILABLE and calls
in flight finish.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.config import ServiceSettings
from service.dataplane import DataPlane, Protocol
from service.errors import ServiceError, internal_error, to_error
from service.protocols import v2
from service.protocols.v2 import InferCall, InputTensor, OutputTensor, RequestedOutput, bad_request

log = logging.getLogger("anytime.grpc")
PROTOCOL = Protocol("v2-grpc", lambda kind: kind.status)  # labelled with the HTTP-equivalent status
ERROR_CODE = "anytime-error-code"  # trailing metadata: the error table's stable code


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the error table's gRPC code and the message (no stack trace leaves)."""
    error = to_error(exc)
    if error is None:
        log.error("unhandled error", exc_info=exc)
        error = internal_error()
    code = grpc.StatusCode[error.kind.grpc]
    await context.abort(code, error.message, trailing_metadata=((ERROR_CODE, error.code),))
    raise AssertionError("context.abort returns by raising")


def _parameter(p: pb.InferParameter) -> Any:
    choice = p.WhichOneof("parameter_choice")
    return getattr(p, choice) if choice else None


def _parameters(params: Any) -> dict[str, Any]:
    """A map of InferParameter or ModelRepositoryParameter as plain values."""
    return {key: _parameter(value) for key, value in params.items()}


def parse(request: pb.ModelInferRequest) -> InferCall:
    """An InferCall from a ModelInferRequest (tensor contents or raw_input_contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise bad_request(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        count = v2.element_count(tensor.name, shape)
        if tensor.datatype == "BYTES":
            elements = v2.split_bytes(tensor.name, raw[i], count) if raw else list(tensor.contents.bytes_contents)
            if len(elements) != count:
                raise bad_request(f"input {tensor.name!r}: shape {shape} needs {count} elements, got {len(elements)}")
            inputs.append(InputTensor(tensor.name, "BYTES", shape, elements=elements))
        elif tensor.datatype == "FP32":
            array = v2.fp32_array(tensor.name, shape, list(tensor.contents.fp32_contents), raw[i] if raw else None)
            inputs.append(InputTensor(tensor.name, "FP32", shape, array=array))
        else:
            inputs.append(InputTensor(tensor.name, tensor.datatype, shape))
    outputs = []
    for out in request.outputs:
        k = _parameter(out.parameters["classification"]) if "classification" in out.parameters else None
        outputs.append(RequestedOutput(out.name, k))
    parameters = {key: _parameter(value) for key, value in request.parameters.items()}
    return InferCall(request.model_name, request.model_version or None, inputs, outputs, parameters, request.id)


def encode(call: InferCall, name: str, version: str, outputs: list[OutputTensor]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=call.id or "")
    for out in outputs:
        response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        response.raw_output_contents.append(out.raw())
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The core RPCs of the protocol, served by the data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        try:
            self.plane.check_ready()
        except ServiceError:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            model = self.plane.model(request.name, request.version or None)
        except Exception as exc:
            await abort(context, exc)
        return pb.ModelReadyResponse(ready=model.engine.alive)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**v2.server_metadata())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            meta = v2.model_metadata(self.plane.model(request.name, request.version or None))
        except Exception as exc:
            await abort(context, exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        try:
            config = v2.model_config(self.plane.model(request.name, request.version or None))
        except Exception as exc:
            await abort(context, exc)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, mc.ModelConfig()))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        try:
            stats = v2.statistics(self.plane, request.name or None, request.version or None)
        except Exception as exc:
            await abort(context, exc)
        # `exit_stats` is Anytime's own and has no field in Triton's message: REST alone carries it.
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        try:
            entries = await v2.repository_index(self.plane, request.ready)
        except Exception as exc:
            await abort(context, exc)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self._control("load", request, context)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._control("unload", request, context)
        return pb.RepositoryModelUnloadResponse()

    async def _control(self, action: str, request: Any, context: Any) -> None:
        """A load or unload (the two requests carry the same fields); errors end the call."""
        try:
            await v2.control(self.plane, action, request.model_name, _parameters(request.parameters))
        except Exception as exc:
            await abort(context, exc)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        received = time.monotonic()
        plane = self.plane
        try:
            async with plane.call(PROTOCOL, request.model_name, request.model_version or None) as model:
                call = parse(request)
                budgets = v2.budgets(call.parameters, None, context.time_remaining())
                outputs = await v2.execute(call, model, plane, received, budgets, max_items=plane.settings.max_files)
                return encode(call, model.name, model.version, outputs)
        except Exception as exc:
            await abort(context, exc)


def _unimplemented(rpc: str) -> Any:
    async def answer(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not implemented by this server (see GET /v2)")
        raise AssertionError("context.abort returns by raising")

    answer.__name__ = rpc
    return answer


# The service's other RPCs answer UNIMPLEMENTED with a sentence (the generated base class's answer is
# a Python exception's text).
UNIMPLEMENTED = sorted(
    name
    for name in dir(pb_grpc.GRPCInferenceServiceServicer)
    if not name.startswith("_") and name not in vars(InferenceServicer)
)
for _rpc in UNIMPLEMENTED:
    setattr(InferenceServicer, _rpc, _unimplemented(_rpc))


async def start(plane: DataPlane, settings: ServiceSettings) -> grpc.aio.Server:
    """A started grpc.aio server on ANYTIME_HOST:ANYTIME_GRPC_PORT, its message size capped like HTTP bodies."""
    limit = settings.max_body_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 4 * limit)]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server
