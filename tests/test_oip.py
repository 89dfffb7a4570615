"""The Open Inference Protocol (KServe v2) over REST and gRPC, driven by clients nobody here wrote.

tritonclient (HTTP with JSON and binary data, and gRPC) runs in this process; KServe's clients run in
a subprocess (tests/kserve_client.py), because KServe's generated protobuf modules and tritonclient's
register the same `inference.*` symbols and cannot be imported into one process. Real servers on
127.0.0.1; every load is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from PIL import Image
from tritonclient.utils import InferenceServerException

from models.artifact import read_manifest, resolve_artifact
from tests.helpers import ROOT, ServerProcess, free_port, make_artifact, metric, png_bytes
from training.data import load_data

FINAL_EXIT = len(read_manifest(resolve_artifact(ROOT / "model_store", "fashion-mnist")).exits)  # the bundled model


@pytest.fixture(scope="module")
def images() -> list[tuple[bytes, int]]:
    test = load_data("fashion-mnist", allow_download=False).test
    return [(png_bytes(Image.fromarray(test.images[i][0].numpy())), int(test.labels[i])) for i in range(200)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The bundled model with gRPC on a free port."""
    log_dir = tmp_path_factory.mktemp("oip")
    srv = ServerProcess(ROOT / "model_store", "fashion-mnist", log_dir=log_dir, grpc_port=free_port()).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def _grpc_port(server: ServerProcess) -> str:
    assert server.grpc_address is not None
    return server.grpc_address


def test_rest_health_and_metadata_with_tritonclient(server: ServerProcess) -> None:
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fashion-mnist")
    assert not client.is_model_ready("nothing")
    meta = client.get_server_metadata()
    assert meta["name"] == "anytime" and {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    served = resolve_artifact(ROOT / "model_store", "fashion-mnist").name
    model = client.get_model_metadata("fashion-mnist")
    assert model["versions"] == [served] and model["platform"] == "pytorch"
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"]} == {
        "image": ("BYTES", [-1, 1]), "input": ("FP32", [-1, 1, 28, 28]),
    }  # fmt: skip
    assert {t["name"]: t["shape"] for t in model["outputs"]}["probabilities"] == [-1, 10]
    assert client.get_model_metadata("fashion-mnist", served)["name"] == "fashion-mnist"
    with pytest.raises(InferenceServerException, match="no model named"):
        client.get_model_metadata("nothing")
    assert httpx.get(f"{server.url}/v2/models/fashion-mnist/versions/9/ready").status_code == 404


@pytest.mark.parametrize("binary", [True, False])
def test_rest_infer_encoded_images_and_tensors(server: ServerProcess, images: list, binary: bool) -> None:
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    pngs = np.array([images[i][0] for i in range(4)], dtype=object)
    image = thttp.InferInput("image", [4], "BYTES")
    image.set_data_from_numpy(pngs, binary_data=True)  # JSON cannot carry raw image bytes
    outputs = [
        thttp.InferRequestedOutput("label", binary_data=binary),
        thttp.InferRequestedOutput("exit", binary_data=binary),
        thttp.InferRequestedOutput("probabilities", binary_data=binary, class_count=3),
    ]
    res = client.infer("fashion-mnist", [image], outputs=outputs, request_id="req-7")
    assert res.get_response()["id"] == "req-7"
    assert {o["name"] for o in res.get_response()["outputs"]} == {"label", "exit", "probabilities"}
    top3 = res.as_numpy("probabilities")
    assert top3.shape == (4, 3)
    first = (top3[0, 0].decode() if isinstance(top3[0, 0], bytes) else top3[0, 0]).split(":")
    label0 = res.as_numpy("label")[0]
    assert float(first[0]) > 0 and first[2] == (label0.decode() if isinstance(label0, bytes) else label0)
    assert set(res.as_numpy("exit").tolist()) <= set(range(1, FINAL_EXIT + 1))
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    tensor = thttp.InferInput("input", [3, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    res = client.infer("fashion-mnist", [tensor])  # no outputs named: all of them
    assert res.as_numpy("class_index").shape == (3,) and res.as_numpy("probabilities").shape == (3, 10)
    np.testing.assert_allclose(res.as_numpy("probabilities").sum(1), 1.0, rtol=1e-5)
    assert res.as_numpy("confidence").dtype == np.float32 and res.as_numpy("exit").dtype == np.int32


def test_json_base64_and_raw_binary_forms(server: ServerProcess, images: list) -> None:
    png = images[0][0]
    body = {"id": "j1", "parameters": {"threshold": 1},
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}],
            "outputs": [{"name": "exit"}, {"name": "reason"}]}  # fmt: skip
    r = httpx.post(f"{server.url}/v2/models/fashion-mnist/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
    assert r.json()["id"] == "j1" and out == {"exit": [FINAL_EXIT], "reason": ["final"]}  # threshold 1: full depth
    served = resolve_artifact(ROOT / "model_store", "fashion-mnist").name
    raw = httpx.post(f"{server.url}/v2/models/fashion-mnist/versions/{served}/infer", content=png,
                     headers={"Inference-Header-Content-Length": "0"})  # fmt: skip
    assert raw.status_code == 200 and raw.json()["model_version"] == served


def _grpc_image(png: bytes, n: int = 1) -> tgrpc.InferInput:
    image = tgrpc.InferInput("image", [n], "BYTES")
    image.set_data_from_numpy(np.array([png] * n, dtype=object))
    return image


def test_grpc_health_metadata_and_infer(server: ServerProcess, images: list) -> None:
    client = tgrpc.InferenceServerClient(_grpc_port(server))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fashion-mnist")
    assert client.get_server_metadata().name == "anytime"
    meta = client.get_model_metadata("fashion-mnist")
    assert [i.name for i in meta.inputs] == ["image", "input"] and list(meta.inputs[1].shape) == [-1, 1, 28, 28]
    outputs = [tgrpc.InferRequestedOutput("label"), tgrpc.InferRequestedOutput("confidence", class_count=2)]
    res = client.infer("fashion-mnist", [_grpc_image(images[0][0], 3)], outputs=outputs, request_id="g1")
    assert res.get_response().id == "g1" and res.as_numpy("label").shape == (3,)
    assert res.as_numpy("confidence").shape == (3, 2)
    x = np.zeros((2, 1, 28, 28), np.float32)
    tensor = tgrpc.InferInput("input", [2, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(x)
    assert client.infer("fashion-mnist", [tensor]).as_numpy("exit").shape == (2,)
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        client.infer("nothing", [tensor])
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "anytime_requests_total", protocol="v2-grpc", status="200") >= 2
    assert metric(text, "anytime_requests_total", protocol="v2-grpc", status="404") == 1


@pytest.mark.slow
def test_protocol_answers_equal_classify_on_200_images(server: ServerProcess, images: list) -> None:
    rest = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    grpc_client = tgrpc.InferenceServerClient(_grpc_port(server))
    names = ("label", "exit", "confidence")
    with httpx.Client(base_url=server.url) as http:
        for png, _ in images:
            c = http.post("/classify", content=png, headers={"content-type": "image/png"}).json()
            want = (c["label"], c["exit"], c["confidence"])
            image = thttp.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array([png], dtype=object), binary_data=True)
            r = rest.infer("fashion-mnist", [image], outputs=[thttp.InferRequestedOutput(n) for n in names])
            g = grpc_client.infer(
                "fashion-mnist", [_grpc_image(png)], outputs=[tgrpc.InferRequestedOutput(n) for n in names]
            )
            for res in (r, g):
                label = res.as_numpy("label")[0]
                got = (label.decode() if isinstance(label, bytes) else label, int(res.as_numpy("exit")[0]),
                       float(res.as_numpy("confidence")[0]))  # fmt: skip
                assert got[:2] == want[:2] and got[2] == pytest.approx(want[2], rel=1e-6)


def test_kserve_clients_rest_and_grpc(server: ServerProcess, images: list, tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    png.write_bytes(images[0][0])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "kserve_client.py"), server.url, _grpc_port(server), str(png)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    label = httpx.post(f"{server.url}/classify", content=images[0][0], headers={"content-type": "image/png"})
    assert result["rest"]["label"] == result["grpc"]["label"] == label.json()["label"]
    assert result["rest"]["ready"] and result["grpc"]["ready"] and result["rest"]["tensor_classes"] == 2


# -- deadlines, overload and draining, with stages of set durations -------------------------------


@pytest.fixture()
def sleepy(tmp_path: Path, workers: int) -> Iterator[ServerProcess]:
    make_artifact(tmp_path, "sleepy", "test_sleepy", [1.0, 1.0, 1.0, 0.0], stage_ms=[60] * 4)
    srv = ServerProcess(tmp_path, "sleepy", grpc_port=free_port(), max_batch=1, queue_size=2, warmup="false",
                        drain_timeout_s=20, workers=workers).wait_ready()  # fmt: skip
    yield srv
    srv.stop()


@pytest.mark.slow
def test_deadlines_and_overload_over_both_transports(sleepy: ServerProcess) -> None:
    png = png_bytes(Image.new("L", (28, 28), 80))
    rest = thttp.InferenceServerClient(sleepy.url.removeprefix("http://"), concurrency=16)
    image = thttp.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=object), binary_data=True)
    with pytest.raises(InferenceServerException, match="exit 1 needs") as info:
        rest.infer("sleepy", [image], timeout=20_000)  # Triton's timeout, in µs: 20 ms < one 60 ms stage
    assert info.value.status() == "504"
    # Two 60 ms stages fit in 180 ms less the answer margin (5 % of it), three do not (the slack covers the
    # hop to an engine process, whose first job of a server started without warm-up also pays its cold path).
    answered = rest.infer("sleepy", [image], parameters={"deadline_ms": 180})
    assert (int(answered.as_numpy("exit")[0]), answered.as_numpy("reason")[0]) == (2, "deadline")
    grpc_client = tgrpc.InferenceServerClient(_grpc_port(sleepy))
    with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
        grpc_client.infer("sleepy", [_grpc_image(png)], client_timeout=0.03)
    # A queue of 2 and 10 requests at once: some answered, the rest 503 (REST) / RESOURCE_EXHAUSTED (gRPC).
    pending = [rest.async_infer("sleepy", [image]) for _ in range(10)]
    statuses = []
    for p in pending:
        try:
            p.get_result()
            statuses.append("200")
        except InferenceServerException as exc:
            statuses.append(exc.status())
    assert "200" in statuses and "503" in statuses and set(statuses) <= {"200", "503"}, statuses

    async def burst() -> list[str]:
        client = tgrpc_aio.InferenceServerClient(_grpc_port(sleepy))
        calls = [client.infer("sleepy", [_grpc_image(png)]) for _ in range(10)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await client.close()
        return ["OK" if not isinstance(r, Exception) else str(r) for r in results]

    codes = asyncio.run(burst())
    assert "OK" in codes and any("RESOURCE_EXHAUSTED" in c for c in codes), codes


@pytest.mark.slow
def test_sigterm_drains_grpc_calls_in_flight(sleepy: ServerProcess) -> None:
    png = png_bytes(Image.new("L", (28, 28), 80))

    async def scenario() -> tuple[list[str], str]:
        client = tgrpc_aio.InferenceServerClient(_grpc_port(sleepy))
        inflight = [asyncio.create_task(client.infer("sleepy", [_grpc_image(png)])) for _ in range(2)]
        await asyncio.sleep(0.1)
        sleepy.terminate()
        end = time.monotonic() + 5
        while time.monotonic() < end:  # the HTTP listener closes once SIGTERM is handled (no grace in tests)
            try:
                httpx.get(f"{sleepy.url}/readyz", timeout=1)
            except httpx.TransportError:
                break
            await asyncio.sleep(0.02)
        try:
            await client.infer("sleepy", [_grpc_image(png)])
            late = "OK"
        except Exception as exc:  # UNAVAILABLE, or the connection refused
            late = str(exc)
        results = await asyncio.gather(*inflight, return_exceptions=True)
        await client.close()
        return ["OK" if not isinstance(r, Exception) else str(r) for r in results], late

    done, late = asyncio.run(scenario())
    assert done == ["OK", "OK"] and "UNAVAILABLE" in late, (done, late)
    assert sleepy.stop() == 0


# -- a hostile corpus: never a 5xx, never a dead server ----------------------------------------------


def _binary(header: dict, raw: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text))}


def _bytes_element(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def _tensor(name: str = "image", shape: list | None = None, datatype: str = "BYTES", **fields: object) -> dict:
    return {"name": name, "shape": [1] if shape is None else shape, "datatype": datatype, **fields}


def _json(*inputs: dict, **request: object) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": list(inputs), **request}).encode(), {}


HI = ["aGk="]  # base64 of b"hi"
HOSTILE_REST: list[tuple[str, bytes, dict[str, str]]] = [
    ("not json", b"{", {}),
    ("json list", b"[]", {}),
    ("no inputs", b'{"inputs": []}', {}),
    ("header length not a number", b"{}", {"Inference-Header-Content-Length": "ten"}),
    ("negative header length", b"{}", {"Inference-Header-Content-Length": "-3"}),
    ("header longer than body", b"{}", {"Inference-Header-Content-Length": "999"}),
    ("wrong datatype", *_json(_tensor(datatype="FP32", data=[1.0]))),
    ("unknown input", *_json(_tensor("pixels", data=HI))),
    ("shape mismatch", *_json(_tensor("input", [1, 1, 28, 28], "FP32", data=[0.0] * 10))),
    ("wrong tensor shape", *_json(_tensor("input", [1, 3, 28, 28], "FP32", data=[0.0] * 2352))),
    ("huge declared shape", *_json(_tensor("input", [10**12, 1, 28, 28], "FP32", data=[0.0]))),
    ("negative shape", *_json(_tensor(shape=[-1], data=[]))),
    ("nan in tensor", b'{"inputs": [{"name": "input", "shape": [1, 1, 1, 1], "datatype": "FP32", "data": [NaN]}]}', {}),
    ("bad base64", *_json(_tensor(data=["***"]))),
    ("not an image", *_json(_tensor(data=["aGVsbG8="]))),
    ("unknown output", *_json(_tensor(data=HI), outputs=[{"name": "logits"}])),
    ("classification out of range",
     *_json(_tensor(data=HI), outputs=[{"name": "label", "parameters": {"classification": 99}}])),
    ("bad threshold", *_json(_tensor(data=HI), parameters={"threshold": "high"})),
    ("negative timeout", *_json(_tensor(data=HI), parameters={"timeout": -5})),
    ("too many images", *_json(_tensor(shape=[100], data=HI * 100))),
    ("truncated binary", *_binary({"inputs": [_tensor(parameters={"binary_data_size": 50})]}, b"\x05\x00\x00\x00ab")),
    ("length prefix past the end",
     *_binary({"inputs": [_tensor(parameters={"binary_data_size": 6})]}, b"\xff\x00\x00\x00ab")),
    ("unclaimed binary bytes", *_binary({"inputs": [_tensor(data=HI)]}, b"extra")),
    ("binary fp32 of wrong length",
     *_binary({"inputs": [_tensor("input", [1, 1, 28, 28], "FP32", parameters={"binary_data_size": 12})]}, b"\0" * 12)),
    ("two elements, shape says one", *_binary({"inputs": [_tensor(parameters={"binary_data_size": 12})]},
                                              _bytes_element(b"ab") + _bytes_element(b"cd"))),
    ("raw binary that is no image", b"garbage", {"Inference-Header-Content-Length": "0"}),
]  # fmt: skip


@pytest.mark.parametrize("case,body,headers", HOSTILE_REST, ids=[c[0] for c in HOSTILE_REST])
def test_hostile_rest_requests_get_4xx_with_the_protocol_error_body(
    server: ServerProcess, case: str, body: bytes, headers: dict[str, str]
) -> None:
    r = httpx.post(f"{server.url}/v2/models/fashion-mnist/infer", content=body, headers=headers, timeout=30)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "code"} and isinstance(body["error"], str) and body["error"] and body["code"]
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}


def test_hostile_grpc_requests_get_client_errors(server: ServerProcess) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(_grpc_port(server))
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def request(**tensor: object) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="fashion-mnist")
        req.inputs.add(**tensor)
        return req

    cases = {
        "raw contents for no input": pb.ModelInferRequest(model_name="fashion-mnist", raw_input_contents=[b"x"]),
        "wrong datatype": request(name="image", datatype="INT8", shape=[1]),
        "shape mismatch": request(name="input", datatype="FP32", shape=[1, 1, 28, 28],
                                  contents=pb.InferTensorContents(fp32_contents=[0.0] * 5)),
        "huge declared shape": request(name="input", datatype="FP32", shape=[2**40, 1, 28, 28]),
        "element count": request(name="image", datatype="BYTES", shape=[3],
                                 contents=pb.InferTensorContents(bytes_contents=[b"x"])),
        "not an image": request(name="image", datatype="BYTES", shape=[1],
                                contents=pb.InferTensorContents(bytes_contents=[b"hello"])),
    }  # fmt: skip
    truncated = request(name="image", datatype="BYTES", shape=[1])
    truncated.raw_input_contents.append(b"\xff\xff\x00\x00ab")
    cases["truncated raw bytes"] = truncated
    for case, req in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=30)
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), case
    channel.close()
    assert tgrpc.InferenceServerClient(_grpc_port(server)).is_server_live()


def test_v2_answers_are_counted_in_the_same_metrics(server: ServerProcess) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "anytime_requests_total", protocol="v2-rest", status="200") >= 1
    assert metric(text, "anytime_exits_total", model="fashion-mnist") >= 1  # the same per-exit counters
