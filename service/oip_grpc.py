"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, in the server's process.

The six core RPCs (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer)
on grpc.aio, on the same event loop and engines as HTTP, listening on ANYTIME_HOST:ANYTIME_GRPC_PORT.
The message and service classes are the generated modules `tritonclient[grpc]` ships (Triton's
service is the same `inference.GRPCInferenceService`, a superset of KServe's; the other RPCs answer
UNIMPLEMENTED). The call's gRPC deadline is a latency budget like X-Deadline-Ms. Errors map to gRPC
status codes; while draining (service/drain.py) ServerReady says false, and once HTTP has closed its
listener new calls get UNAVAILABLE and calls in flight finish.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service import oip
from service.config import ServiceSettings
from service.errors import ApiError, api_error
from service.oip import InferCall, InputTensor, OutputTensor, RequestedOutput, bad_request
from service.state import ServiceState

log = logging.getLogger("anytime.grpc")
PROTOCOL = "v2-grpc"  # the `protocol` label of anytime_requests_total
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT, 500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}  # fmt: skip


def status_code(error: ApiError) -> grpc.StatusCode:
    """The gRPC status of an HTTP-shaped error; a full queue is RESOURCE_EXHAUSTED, not UNAVAILABLE."""
    if error.code == "overloaded":
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return _CODES.get(error.status, grpc.StatusCode.UNKNOWN)


def _parameter(p: pb.InferParameter) -> Any:
    choice = p.WhichOneof("parameter_choice")
    return getattr(p, choice) if choice else None


def parse(request: pb.ModelInferRequest) -> InferCall:
    """An InferCall from a ModelInferRequest (tensor contents or raw_input_contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise bad_request(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        count = oip.element_count(tensor.name, shape)
        if tensor.datatype == "BYTES":
            elements = oip.split_bytes(tensor.name, raw[i], count) if raw else list(tensor.contents.bytes_contents)
            if len(elements) != count:
                raise bad_request(f"input {tensor.name!r}: shape {shape} needs {count} elements, got {len(elements)}")
            inputs.append(InputTensor(tensor.name, "BYTES", shape, elements=elements))
        elif tensor.datatype == "FP32":
            array = oip.fp32_array(tensor.name, shape, list(tensor.contents.fp32_contents), raw[i] if raw else None)
            inputs.append(InputTensor(tensor.name, "FP32", shape, array=array))
        else:
            inputs.append(InputTensor(tensor.name, tensor.datatype, shape))
    outputs = []
    for out in request.outputs:
        k = _parameter(out.parameters["classification"]) if "classification" in out.parameters else None
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
            raise bad_request(f"output {out.name!r}: classification must be an integer")
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
    """The core RPCs of the protocol, served from the shared state."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        error = api_error(exc)
        if error is None:
            log.error("unhandled error", exc_info=exc)
            error = ApiError(500, "internal_error", "the server failed to process the request")
        await context.abort(status_code(error), error.message)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.ready and not self.state.draining)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.state.check_ready()
            model = self.state.registry.get(request.name, request.version or None)
        except Exception as exc:
            await self._abort(context, exc)
        return pb.ModelReadyResponse(ready=model.engine.alive)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**oip.server_metadata())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            self.state.check_serving()
            meta = oip.model_metadata(self.state.registry.get(request.name, request.version or None))
        except Exception as exc:
            await self._abort(context, exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]],
        )  # fmt: skip

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        received = time.monotonic()
        state, served, status = self.state, None, 500
        try:
            state.check_serving()
            async with state.registry.lease(request.model_name, request.model_version or None) as model:
                served = model
                call = parse(request)
                outputs = await oip.execute(
                    call, model, received, grpc_remaining_s=context.time_remaining(),
                    max_items=state.settings.max_files,
                )  # fmt: skip
                status = 200
                return encode(call, model.name, model.version, outputs)
        except Exception as exc:
            error = api_error(exc)
            status = error.status if error is not None else 500
            await self._abort(context, exc)  # raises: the call ends with the mapped status
        finally:
            if served is not None:
                served.metrics.request(PROTOCOL, status)
                served.metrics.request_latency.observe(time.monotonic() - received)
            else:
                state.metrics.requests.labels("", "", PROTOCOL, str(status)).inc()


async def start(state: ServiceState, settings: ServiceSettings) -> grpc.aio.Server:
    """A started grpc.aio server on ANYTIME_HOST:ANYTIME_GRPC_PORT, its message size capped like HTTP bodies."""
    limit = settings.max_body_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 4 * limit)]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server
