"""Triton's tools against Anytime: the model configuration and the inference statistics extensions,
with tritonclient over REST and gRPC, in both process models; the RPCs not implemented say so."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from google.protobuf import json_format
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from models.artifact import read_manifest, resolve_artifact
from tests.helpers import ROOT, ServerProcess, free_port, make_artifact, metric, png_bytes

PNG = png_bytes(Image.new("L", (28, 28), 90))
MANIFEST = read_manifest(resolve_artifact(ROOT / "model_store", "fashion-mnist"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, workers: int) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("triton")
    srv = ServerProcess(
        ROOT / "model_store", "fashion-mnist", log_dir=log_dir, grpc_port=free_port(), workers=workers, max_batch=8
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def _clients(server: ServerProcess) -> tuple[thttp.InferenceServerClient, tgrpc.InferenceServerClient]:
    assert server.grpc_address is not None
    return thttp.InferenceServerClient(server.url.removeprefix("http://")), tgrpc.InferenceServerClient(
        server.grpc_address
    )


def test_the_model_configuration_is_tritons_and_equal_over_rest_and_grpc(server: ServerProcess) -> None:
    rest, rpc = _clients(server)
    assert {"model_configuration", "statistics"} <= set(rest.get_server_metadata()["extensions"])
    config = rest.get_model_config("fashion-mnist")
    assert config["name"] == "fashion-mnist" and config["max_batch_size"] == 8
    inputs = {t["name"]: t for t in config["input"]}
    assert inputs["image"]["data_type"] == "TYPE_STRING" and inputs["image"]["dims"] == [1]
    assert inputs["input"]["dims"] == [1, 28, 28] and all(t["optional"] for t in config["input"])
    outputs = {t["name"]: t["dims"] for t in config["output"]}
    assert outputs["probabilities"] == [10] and outputs["label"] == [1]
    assert {t["name"]: t.get("reshape") for t in config["output"]}["label"] == {"shape": []}
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 256
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert len(json.loads(config["parameters"]["thresholds"]["string_value"])) == len(MANIFEST.exits)
    # gRPC: the same configuration, as Triton's ModelConfig message
    grpc_config = json_format.MessageToDict(
        rpc.get_model_config("fashion-mnist", MANIFEST.version).config, preserving_proto_field_name=True
    )
    assert grpc_config["max_batch_size"] == 8 and grpc_config["input"][1]["dims"] == ["1", "28", "28"]
    assert grpc_config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 256
    assert grpc_config["parameters"] == config["parameters"]
    with pytest.raises(InferenceServerException, match="no model named"):
        rest.get_model_config("nothing")
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        rpc.get_model_config("nothing")


def _stats(rest: thttp.InferenceServerClient) -> dict:
    [entry] = rest.get_inference_statistics("fashion-mnist")["model_stats"]
    return entry


def test_statistics_count_every_request_once_over_both_transports(server: ServerProcess) -> None:
    rest, rpc = _clients(server)
    before = _stats(rest)
    image = thttp.InferInput("image", [3], "BYTES")
    image.set_data_from_numpy(np.array([PNG] * 3, dtype=object))
    for _ in range(4):
        rest.infer("fashion-mnist", [image])
    tensor = tgrpc.InferInput("input", [2, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 1, 28, 28), np.float32))
    for _ in range(3):
        rpc.infer("fashion-mnist", [tensor])
    for _ in range(2):
        assert httpx.post(f"{server.url}/classify", content=PNG, headers={"content-type": "image/png"}).is_success
    wrong = thttp.InferInput("input", [1, 1, 2, 2], "FP32")  # not the model's input shape: 400
    wrong.set_data_from_numpy(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(InferenceServerException):
        rest.infer("fashion-mnist", [wrong])
    after = _stats(rest)
    grpc_after = json_format.MessageToDict(
        rpc.get_inference_statistics("fashion-mnist"), preserving_proto_field_name=True
    )["model_stats"][0]

    def delta(*path: str) -> int:
        a, b = after, before
        for key in path:
            a, b = a[key], b[key]
        return int(a) - int(b)

    assert delta("inference_stats", "success", "count") == 4 + 3 + 2  # requests, not items
    assert delta("inference_stats", "fail", "count") == 1
    assert delta("inference_count") == 4 * 3 + 3 * 2 + 2  # items answered
    assert 1 <= delta("execution_count") <= 4 * 3 + 3 * 2 + 2
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("inference_stats", phase, "ns") > 0, phase
    parts = ("queue", "compute_input", "compute_infer", "compute_output")
    for phase in parts:
        assert delta("inference_stats", phase, "count") == 9, phase
    parts_ns = sum(delta("inference_stats", p, "ns") for p in parts)
    assert parts_ns <= delta("inference_stats", "success", "ns")  # the phases partition a request's time
    assert after["last_inference"] > 0
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) > 0
    assert sum(e["count"] for e in after["exit_stats"]) == after["inference_count"]
    # gRPC reads the same samples: equal figures (no request in between), int64 as JSON strings
    assert grpc_after["inference_stats"]["success"]["count"] == str(after["inference_stats"]["success"]["count"])
    assert int(grpc_after["inference_count"]) == after["inference_count"]
    # ... which /metrics shows too
    text = httpx.get(f"{server.url}/metrics").text
    count = metric(text, "anytime_request_phase_seconds_count", model="fashion-mnist", phase="success")
    assert count == after["inference_stats"]["success"]["count"]


def test_statistics_of_every_model_and_the_errors(server: ServerProcess) -> None:
    rest, rpc = _clients(server)
    every = rest.get_inference_statistics()["model_stats"]
    assert [(e["name"], e["version"]) for e in every] == [("fashion-mnist", MANIFEST.version)]
    assert rest.get_inference_statistics("fashion-mnist", MANIFEST.version)["model_stats"][0]["name"] == "fashion-mnist"
    r = httpx.get(f"{server.url}/v2/models/nothing/stats")
    assert r.status_code == 404 and r.json()["code"] == "model_not_found"
    r = httpx.get(f"{server.url}/v2/models/fashion-mnist/versions/99/config")
    assert r.status_code == 404 and r.json()["code"] == "model_not_found"
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        rpc.get_inference_statistics("nothing")


def test_the_priority_parameter_is_a_level_of_the_server(server: ServerProcess) -> None:
    rest, rpc = _clients(server)
    assert rest.get_model_config("fashion-mnist")["dynamic_batching"]["priority_levels"] == 2
    image = thttp.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([PNG], dtype=object))
    assert rest.infer("fashion-mnist", [image], priority=1).as_numpy("exit").shape == (1,)
    tensor = tgrpc.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    assert rpc.infer("fashion-mnist", [tensor], priority=2).as_numpy("exit").shape == (1,)
    with pytest.raises(
        InferenceServerException, match=r"priority: 3 is not a level of this server \(1, the highest, to 2\)"
    ):
        rest.infer("fashion-mnist", [image], priority=3)
    r = httpx.post(f"{server.url}/classify?priority=1", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 200
    r = httpx.post(f"{server.url}/classify?priority=-1", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option"


def test_rpcs_not_implemented_say_so_in_a_sentence(server: ServerProcess) -> None:
    assert server.grpc_address is not None
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == "SystemSharedMemoryStatus is not implemented by this server (see GET /v2)"


def test_loading_on_request_needs_explicit_model_control(server: ServerProcess) -> None:
    rest, rpc = _clients(server)
    assert [(m["name"], m["state"]) for m in rest.get_model_repository_index()] == [("fashion-mnist", "READY")]
    r = httpx.post(f"{server.url}/v2/repository/models/fashion-mnist/load")
    assert r.status_code == 409 and r.json()["code"] == "model_control_refused"
    assert "ANYTIME_MODEL_CONTROL=explicit" in r.json()["error"]
    with pytest.raises(InferenceServerException, match="FAILED_PRECONDITION"):
        rpc.unload_model("fashion-mnist")


def test_perf_analyzer_input_data_is_tritons_serialization(tmp_path: Path) -> None:
    from tritonclient.utils import serialize_byte_tensor

    from bench.triton import input_data
    from models.preprocess import Preprocess

    files = input_data([PNG, PNG[:-1] + b"x"], Preprocess(MANIFEST.input), tmp_path)
    image = json.loads(files["image"].read_text())["data"]
    serialized = serialize_byte_tensor(np.array([PNG], dtype=object)).item()
    assert base64.b64decode(image[0]["image"]["b64"]) == serialized and len(image) == 2
    tensor = json.loads(files["tensor"].read_text())["data"][0]["input"]
    assert tensor["shape"] == [1, 28, 28] and len(tensor["content"]) == 784


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory, workers: int) -> Iterator[tuple[ServerProcess, Path]]:
    """Explicit model control over a store of two models: `tiny` (the default) and `sleepy` (slow stages)."""
    store = tmp_path_factory.mktemp("explicit")
    make_artifact(store, "tiny")
    make_artifact(store, "sleepy", "test_sleepy", thresholds=[1.0, 1.0, 1.0, 0.0], stage_ms=[150] * 4)
    srv = ServerProcess(
        store, "tiny", grpc_port=free_port(), workers=workers, model_control="explicit", warmup="false", max_batch=1
    ).wait_ready()
    yield srv, store
    assert srv.stop() == 0, srv.output()[-3000:]


def test_repository_index_load_and_unload_in_explicit_mode(explicit: tuple[ServerProcess, Path]) -> None:
    server, store = explicit
    rest, rpc = _clients(server)
    index = {m["name"]: (m["version"], m["state"]) for m in rest.get_model_repository_index()}
    assert index == {"sleepy": ("1", "READY"), "tiny": ("1", "READY")}
    grpc_index = {m.name: m.state for m in rpc.get_model_repository_index().models}
    assert grpc_index == {"sleepy": "READY", "tiny": "READY"}
    # a request in flight while its model unloads is answered; the next is 404
    slow: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: slow.append(httpx.post(f"{server.url}/v1/models/sleepy/classify", content=PNG,
                                              headers={"content-type": "image/png"}, timeout=30))
    )  # fmt: skip
    sender.start()
    time.sleep(0.3)  # inside its 600 ms of stages
    rest.unload_model("sleepy")
    sender.join()
    assert slow[0].status_code == 200 and slow[0].json()["exit"] == 4
    gone = httpx.post(f"{server.url}/v1/models/sleepy/classify", content=PNG, headers={"content-type": "image/png"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert not rest.is_model_ready("sleepy")
    entry = [m for m in rest.get_model_repository_index() if m["name"] == "sleepy"][0]
    assert (entry["state"], entry["reason"]) == ("UNAVAILABLE", "unloaded")
    ready = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}).json()
    assert [m["name"] for m in ready] == ["tiny"]
    # loaded again over gRPC; then a broken version 2 fails to load and version 1 keeps serving
    rpc.load_model("sleepy")
    assert rest.is_model_ready("sleepy", "1")
    path = make_artifact(store, "sleepy", "test_sleepy", version="2")
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    r = httpx.post(f"{server.url}/v2/repository/models/sleepy/load", json={})
    assert r.status_code == 400 and r.json()["code"] == "load_failed", r.text
    assert "sleepy/2 failed to load" in r.json()["error"] and "still serving version 1" in r.json()["error"]
    assert rest.is_model_ready("sleepy", "1")
    entry = [m for m in rest.get_model_repository_index() if m["name"] == "sleepy"][0]
    assert entry["state"] == "READY" and entry["version"] == "1"
    # what cannot be done says so
    r = httpx.post(f"{server.url}/v2/repository/models/tiny/unload")
    assert r.status_code == 409 and "is the default model" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/repository/models/nothing/load")
    assert r.status_code == 404 and r.json()["code"] == "model_not_found"
    r = httpx.post(f"{server.url}/v2/repository/models/sleepy/load", json={"parameters": {"config": "{}"}})
    assert r.status_code == 400 and "not supported" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/repository/index", content=b"{")
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
