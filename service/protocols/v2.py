"""The Open Inference Protocol (KServe v2) without its transports: tensors in, the data plane, tensors out.

`service/protocols/v2_rest.py` (JSON and the binary tensor data extension) and `v2_grpc.py`
(`inference.GRPCInferenceService`) parse a request into an `InferCall` and write its `OutputTensor`s;
everything between is here and goes through the same data plane as `/classify`.

A model takes one of two inputs: `image`, BYTES [N, 1] (or [N]) of encoded images (PNG, JPEG, …), or `input`,
FP32 [N, C, H, W] already preprocessed as the manifest's input spec says. It answers with the
outputs `label` (BYTES), `class_index` (INT64), `confidence` (FP32), `exit` (INT32), `reason`
(BYTES) and `probabilities` (FP32 [N, classes]), each [N] unless said; all of them when the request
names none. The classification extension (`classification: k` on a requested output) turns that
output into BYTES [N, k] of "score:index:label" (k clamped to the number of classes). Request
parameters: `timeout` (microseconds, Triton's), `deadline_ms`, `threshold`, `max_exit`, `priority`; the earliest
deadline of `timeout`, `deadline_ms`, X-Deadline-Ms and the gRPC deadline wins (service/options.py).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service import __version__
from service.dataplane import DataPlane
from service.engine import Answer
from service.errors import INVALID_REQUEST, TOO_MANY_ITEMS, ServiceError
from service.options import budget_ms, option_fields
from service.served import Served
from service.statistics import model_statistics

SERVER_NAME = "anytime"
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "parameters",
    "model_configuration",
    "statistics",
    "schedule_policy",
    "model_repository",
]
PLATFORM = "pytorch"
IMAGE_INPUT, TENSOR_INPUT = "image", "input"
OUTPUTS = {
    "label": "BYTES",
    "class_index": "INT64",
    "confidence": "FP32",
    "exit": "INT32",
    "reason": "BYTES",
    "probabilities": "FP32",
}
NUMPY = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4"}
V2_OPTIONS = ("threshold", "max_exit", "priority")  # request parameters that are options (the budgets aside)


def bad_request(message: str) -> ServiceError:
    """A malformed request (400): the message names the input or field."""
    return ServiceError(message, INVALID_REQUEST)


@dataclass
class InputTensor:
    """One input as parsed from the wire: BYTES elements, or an FP32 array already shaped."""

    name: str
    datatype: str
    shape: list[int]
    elements: list[bytes] | None = None
    array: np.ndarray | None = None


@dataclass
class RequestedOutput:
    name: str
    classification: Any = None  # k of the classification extension (validated as an option)
    binary: bool = False


@dataclass
class InferCall:
    """A parsed inference request, whatever the transport."""

    model: str
    version: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]
    binary: bool = False

    def raw(self) -> bytes:
        """The binary tensor data encoding: 4-byte little-endian length before each BYTES element."""
        if isinstance(self.values, list):  # BYTES
            return b"".join(len(v).to_bytes(4, "little") + v for v in self.values)
        return np.ascontiguousarray(self.values, dtype=NUMPY[self.datatype]).tobytes()

    def json_data(self) -> list:
        if isinstance(self.values, list):  # BYTES
            return [v.decode() for v in self.values]
        return np.asarray(self.values).reshape(-1).tolist()


def element_count(name: str, shape: list[int]) -> int:
    if not shape or any(not isinstance(d, int) or d < 0 for d in shape):
        raise bad_request(f"input {name!r}: shape must be a list of non-negative integers, got {shape}")
    return math.prod(shape)


def split_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """BYTES elements from the binary encoding (each prefixed by its 4-byte little-endian length)."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad_request(f"input {name!r}: binary data ends inside an element's length prefix")
        size = int.from_bytes(raw[pos : pos + 4], "little")
        if pos + 4 + size > len(raw):
            raise bad_request(f"input {name!r}: an element claims {size} bytes, only {len(raw) - pos - 4} follow")
        out.append(raw[pos + 4 : pos + 4 + size])
        pos += 4 + size
    if len(out) != count:
        raise bad_request(f"input {name!r}: shape needs {count} elements, the binary data holds {len(out)}")
    return out


def fp32_array(name: str, shape: list[int], values: Any, raw: bytes | None = None) -> np.ndarray:
    """An FP32 input's data (a JSON list, possibly nested, or raw little-endian floats) as an array."""
    count = element_count(name, shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise bad_request(f"input {name!r}: shape needs {4 * count} bytes of FP32, got {len(raw)}")
        array = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            array = np.asarray(values, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise bad_request(f"input {name!r}: data must be numbers for datatype FP32") from None
        if array.size != count:
            raise bad_request(f"input {name!r}: shape {shape} needs {count} values, data has {array.size}")
    if not np.isfinite(array).all():
        raise bad_request(f"input {name!r}: data must be finite (no NaN or infinity)")
    return array.reshape(shape)


def check_input(tensor: InputTensor, model: Served, max_items: int) -> int:
    """Validate the input's name, datatype and shape against the model; returns N."""
    spec = model.input
    if tensor.name == IMAGE_INPUT:
        if tensor.datatype != "BYTES":
            raise bad_request(f"input 'image' must have datatype BYTES (encoded images), got {tensor.datatype}")
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise bad_request(f"input 'image' must have shape [N] (or [N, 1]), got {tensor.shape}")
    elif tensor.name == TENSOR_INPUT:
        if tensor.datatype != "FP32":
            raise bad_request(f"input 'input' must have datatype FP32, got {tensor.datatype}")
        want = [spec.channels, spec.size, spec.size]
        if len(tensor.shape) != 4 or list(tensor.shape[1:]) != want:
            raise bad_request(f"input 'input' must have shape [N, {', '.join(map(str, want))}], got {tensor.shape}")
    else:
        raise bad_request(f"unknown input {tensor.name!r}; this model takes 'image' (BYTES) or 'input' (FP32)")
    n = tensor.shape[0]
    if n > max_items:
        raise ServiceError(f"input {tensor.name!r}: at most {max_items} items per request", TOO_MANY_ITEMS)
    return n


def budgets(params: Mapping[str, Any], header_ms: float | None, grpc_remaining_s: float | None) -> list[float | None]:
    """Every latency budget of the request (ms): its `timeout` (µs), `deadline_ms`, X-Deadline-Ms and gRPC deadline."""
    return [
        budget_ms("parameters.timeout", params.get("timeout"), scale=1e-3),
        budget_ms("parameters.deadline_ms", params.get("deadline_ms")),
        header_ms,
        grpc_remaining_s * 1e3 if grpc_remaining_s is not None else None,
    ]


def outputs_wanted(call: InferCall, model: Served) -> list[RequestedOutput]:
    """The requested outputs (all of them when none are named); unknown names are a 400."""
    if not call.outputs:
        return [RequestedOutput(name) for name in OUTPUTS]
    for out in call.outputs:
        if out.name not in OUTPUTS:
            raise bad_request(f"unknown output {out.name!r}; outputs: {', '.join(OUTPUTS)}")
        if out.classification is not None:
            where = f"outputs.{out.name}.parameters.classification"
            k = option_fields({"top_k": out.classification}, names={"top_k": where}).top_k
            out.classification = min(k, len(model.classes))  # clamped, like top_k
    return call.outputs


async def execute(
    call: InferCall,
    model: Served,
    plane: DataPlane,
    received: float,
    budgets_ms: Sequence[float | None],
    max_items: int = 64,
) -> list[OutputTensor]:
    """Run a parsed request through `model` and build the requested outputs."""
    if len(call.inputs) != 1:
        raise bad_request(f"send exactly one input ('image' or 'input'), got {len(call.inputs)}")
    tensor = call.inputs[0]
    n = check_input(tensor, model, max_items)
    outputs = outputs_wanted(call, model)
    params = call.parameters
    fields = option_fields(
        {k: params[k] for k in V2_OPTIONS if params.get(k) is not None},
        names={k: f"parameters.{k}" for k in V2_OPTIONS},
    )
    top_k = max([o.classification or 1 for o in outputs])
    want_probs = any(o.name == "probabilities" and o.classification is None for o in outputs)
    fields = fields.model_copy(update={"top_k": top_k})
    options = plane.options(received, fields, budgets_ms, probabilities=want_probs)
    plane.precheck(model, options)  # refuse before decoding, as /classify does
    if tensor.name == IMAGE_INPUT:
        assert tensor.elements is not None
        xs = [await model.prepare(data) for data in tensor.elements]  # every image valid before any compute
    else:
        assert tensor.array is not None
        xs = list(torch.from_numpy(np.array(tensor.array, dtype=np.float32)))
    answers = await asyncio.gather(*(plane.infer(model, x, options) for x in xs))
    return [_output(out, answers, model, n) for out in outputs]


def _output(out: RequestedOutput, answers: list[Answer], model: Served, n: int) -> OutputTensor:
    classes = model.classes
    if out.classification is not None:
        k = out.classification
        values = [f"{p:f}:{i}:{classes[i]}".encode() for a in answers for i, p in a.top_k[:k]]
        return OutputTensor(out.name, "BYTES", [n, k], values, out.binary)
    datatype = OUTPUTS[out.name]
    if out.name == "label":
        return OutputTensor(out.name, datatype, [n], [classes[a.index].encode() for a in answers], out.binary)
    if out.name == "reason":
        return OutputTensor(out.name, datatype, [n], [a.reason.value.encode() for a in answers], out.binary)
    if out.name == "probabilities":
        values = np.array([a.probabilities for a in answers], dtype=np.float32).reshape(n, len(classes))
        return OutputTensor(out.name, datatype, [n, len(classes)], values, out.binary)
    column = {
        "class_index": [a.index for a in answers],
        "confidence": [a.confidence for a in answers],
        "exit": [a.exit for a in answers],
    }[out.name]
    return OutputTensor(out.name, datatype, [n], np.array(column, dtype=NUMPY[datatype]), out.binary)


def model_metadata(model: Served) -> dict[str, Any]:
    """The protocol's model metadata: platform, versions, inputs and outputs (-1 for variable dims)."""
    spec = model.input
    classes = len(model.classes)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [
            # [-1, 1], not [-1]: Triton's tools give every item a shape of at least one dimension
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1, 1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, spec.channels, spec.size, spec.size]},
        ],
        "outputs": [
            {"name": name, "datatype": dt, "shape": [-1, classes] if name == "probabilities" else [-1]}
            for name, dt in OUTPUTS.items()
        ],
    }


def statistics(plane: DataPlane, name: str | None, version: str | None) -> dict[str, Any]:
    """Triton's statistics response: every served version, or the one `name` (and `version`) names (404 if none)."""
    if name is None:
        plane.check_ready()
        served = plane.registry.served()
    else:
        served = [plane.model(name, version)]
    return {"model_stats": model_statistics(plane.metrics, [(m.name, m.version) for m in served])}


async def repository_index(plane: DataPlane, ready_only: bool) -> list[dict[str, str]]:
    """Triton's repository index: every model of the store and every one served, READY or UNAVAILABLE."""
    plane.check_serving()
    entries = await plane.registry.repository_index()
    return [e for e in entries if e["state"] == "READY"] if ready_only else entries


async def control(plane: DataPlane, action: str, name: str, parameters: Mapping[str, Any]) -> None:
    """Load or unload `name` (explicit model control). The store is the only source of a model, so the
    parameters that would give a configuration or files are refused; `unload_dependents` has nothing to act on."""
    plane.check_serving()
    unknown = sorted(set(parameters) - ({"unload_dependents"} if action == "unload" else set()))
    if unknown:
        raise bad_request(
            f"{action} parameters {', '.join(map(repr, unknown))} are not supported: models come from the model "
            "store alone (write a version there, then load)"
        )
    await (plane.registry.load(name) if action == "load" else plane.registry.unload(name))


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


TRITON_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32"}


def _tensor_config(name: str, datatype: str, dims: list[int], optional: bool | None = None) -> dict[str, Any]:
    """One input or output in Triton's model configuration, `dims` without the batch dimension."""
    entry: dict[str, Any] = {"name": name, "data_type": TRITON_TYPES[datatype], "dims": dims}
    if optional is not None:
        entry["optional"] = optional
    return entry


def model_config(model: Served) -> dict[str, Any]:
    """Triton's model configuration (`model_config.proto` field names, JSON as Triton writes it): what
    perf_analyzer and `tritonclient.get_model_config` read. Both inputs are optional: a request sends one."""
    spec, settings, m = model.input, model.settings, model.manifest
    classes = len(model.classes)
    # An output of one value per item is [N] in the metadata: Triton's dims [1] reshaped to [].
    outputs = [
        _tensor_config(name, dt, [classes]) if name == "probabilities" else
        {**_tensor_config(name, dt, [1]), "reshape": {"shape": []}}
        for name, dt in OUTPUTS.items()
    ]  # fmt: skip
    exits = m.exits
    facts = {
        "exits": len(exits),
        "thresholds": [e.threshold for e in exits],
        "flops_fraction": [e.served_flops_fraction or e.flops_fraction for e in exits],
        "val_accuracy": [e.val_accuracy for e in exits],
        "classes": model.classes,
    }
    gpu = model.device.startswith("cuda")
    return {
        "name": model.name,
        "platform": PLATFORM,
        "backend": SERVER_NAME,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": settings.max_batch,
        "input": [
            _tensor_config(IMAGE_INPUT, "BYTES", [1], optional=True),
            _tensor_config(TENSOR_INPUT, "FP32", [spec.channels, spec.size, spec.size], optional=True),
        ],
        "output": outputs,
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
            "priority_levels": settings.priority_levels,
            "default_priority_level": settings.default_priority,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": 0,
                "allow_timeout_override": True,
                "max_queue_size": settings.queue_size,
            },
        },
        "instance_group": [
            {
                "name": f"{model.name}_0",
                "kind": "KIND_GPU" if gpu else "KIND_CPU",
                "count": 1,
                "gpus": [int(model.device.partition(":")[2] or 0)] if gpu else [],
            }
        ],
        "model_transaction_policy": {"decoupled": False},
        "parameters": {key: {"string_value": json.dumps(value)} for key, value in facts.items()},
    }
