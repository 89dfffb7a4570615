"""One request core under three protocols: the same option or budget gets the same verdict and code from
`/classify` (query, header, JSON body), v2 REST and v2 gRPC; the earliest deadline wins everywhere;
the app answers alike with and without the front door; an answer after its deadline is counted
missed; gRPC, like HTTP, is unavailable without a running engine; /docs loads nothing from another
host."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.app import build
from service.config import ServiceSettings
from service.dataplane import DataPlane
from service.errors import TABLE, v2_status
from service.metrics import Metrics
from service.protocols import v2_grpc
from service.registry import ModelRegistry
from service.warmup import asgi_request
from tests.helpers import ServerProcess, free_port, make_artifact, metric, png_bytes

PNG = png_bytes(Image.new("L", (28, 28), 90))
B64 = base64.b64encode(PNG).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """test_sleepy: every stage takes 30 ms, so a 5 ms budget cannot reach exit 1 and 10 s can."""
    store = tmp_path_factory.mktemp("core")
    make_artifact(store, "m", "test_sleepy", thresholds=[1.0, 1.0, 1.0, 0.0], stage_ms=[30] * 4)
    srv = ServerProcess(store, "m", grpc_port=free_port(), warmup="false").wait_ready()
    yield srv
    assert srv.stop() == 0


def _classify_query(server: ServerProcess, **params: Any) -> tuple[int, str]:
    import httpx

    r = httpx.post(f"{server.url}/classify", content=PNG, headers={"content-type": "image/png"}, params=params)
    return r.status_code, r.json()["error"]["code"] if r.status_code != 200 else "ok"


def _classify_body(server: ServerProcess, **options: Any) -> tuple[int, str]:
    import httpx

    r = httpx.post(f"{server.url}/classify", json={"image": B64, **options})
    return r.status_code, r.json()["error"]["code"] if r.status_code != 200 else "ok"


def _classify_header(server: ServerProcess, deadline: Any, **params: Any) -> tuple[int, str]:
    import httpx

    headers = {"content-type": "image/png", "x-deadline-ms": str(deadline)}
    r = httpx.post(f"{server.url}/classify", content=PNG, headers=headers, params=params)
    return r.status_code, r.json()["error"]["code"] if r.status_code != 200 else "ok"


def _v2_rest(server: ServerProcess, parameters: dict[str, Any], classification: Any = None) -> tuple[int, str]:
    import httpx

    output: dict[str, Any] = {"name": "label"}
    if classification is not None:
        output["parameters"] = {"classification": classification}
    body = {
        "parameters": parameters,
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}],
        "outputs": [output],
    }
    r = httpx.post(f"{server.url}/v2/models/m/infer", content=json.dumps(body), timeout=30)
    return r.status_code, r.json()["code"] if r.status_code != 200 else "ok"


def _grpc_parameter(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _v2_grpc(
    server: ServerProcess, parameters: dict[str, Any], classification: Any = None, timeout: float | None = None
) -> tuple[str, str]:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(PNG)
    out = request.outputs.add(name="label")
    if classification is not None:
        _grpc_parameter(out.parameters["classification"], classification)
    for key, value in parameters.items():
        _grpc_parameter(request.parameters[key], value)
    assert server.grpc_address is not None
    with grpc.insecure_channel(server.grpc_address) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout or 30)
        except grpc.RpcError as exc:
            code = dict(exc.trailing_metadata() or ()).get(v2_grpc.ERROR_CODE, "")
            return exc.code().name, code
    return "OK", "ok"


BAD_OPTIONS = [
    ("threshold", 2.0),
    ("threshold", "nan"),
    ("max_exit", 2.7),
    ("max_exit", 0),
    ("max_exit", 99),  # the model has 4 exits
    ("deadline_ms", -1.0),
    ("deadline_ms", 0.0),
    ("deadline_ms", "soon"),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS, ids=[f"{n}={v}" for n, v in BAD_OPTIONS])
def test_a_bad_option_gets_the_same_verdict_and_code_from_every_protocol(
    server: ServerProcess, name: str, value: Any
) -> None:
    expected = ("invalid_option", 422, 400, "INVALID_ARGUMENT")
    got = [_classify_query(server, **{name: value}), _classify_body(server, **{name: value})]
    if name == "deadline_ms":
        got.append(_classify_header(server, value))
    assert {code for _, code in got} == {expected[0]} and {status for status, _ in got} == {expected[1]}, got
    assert _v2_rest(server, {name: value}) == (expected[2], expected[0])
    assert _v2_grpc(server, {name: value}) == (expected[3], expected[0])


def test_top_k_and_classification_are_one_option(server: ServerProcess) -> None:
    for bad in (0, 1.5, 1001):
        assert _classify_query(server, top_k=bad) == (422, "invalid_option")
        assert _v2_rest(server, {}, classification=bad) == (400, "invalid_option")
        assert _v2_grpc(server, {}, classification=bad) == ("INVALID_ARGUMENT", "invalid_option")
    # Above the class count: clamped everywhere, and the answer says how many came back.
    import httpx

    r = httpx.post(f"{server.url}/classify", content=PNG, headers={"content-type": "image/png"}, params={"top_k": 50})
    assert r.status_code == 200 and len(r.json()["top_k"]) == 10
    body = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}],
        "outputs": [{"name": "label", "parameters": {"classification": 50}}],
    }
    out = httpx.post(f"{server.url}/v2/models/m/infer", json=body).json()["outputs"][0]
    assert out["shape"] == [1, 10] and len(out["data"]) == 10


def test_the_earliest_of_two_budgets_wins_in_every_protocol(server: ServerProcess) -> None:
    """Exit 1 takes 30 ms: a 5 ms budget beside a 10 s one is answered 504, whichever comes where."""
    late = (504, "deadline_exceeded")
    assert _classify_header(server, 5, deadline_ms=10_000) == late
    assert _classify_header(server, 10_000, deadline_ms=5) == late
    assert _classify_body(server, deadline_ms=5) == late
    assert _v2_rest(server, {"deadline_ms": 10_000, "timeout": 5_000}) == late  # timeout is in µs
    assert _v2_rest(server, {"deadline_ms": 5, "timeout": 10_000_000}) == late
    assert _v2_grpc(server, {"deadline_ms": 5}, timeout=10) == ("DEADLINE_EXCEEDED", "deadline_exceeded")
    # Both generous: answered.
    assert _classify_header(server, 10_000, deadline_ms=20_000) == (200, "ok")
    assert _v2_rest(server, {"deadline_ms": 10_000, "timeout": 20_000_000}) == (200, "ok")


def test_a_budget_exit_1_cannot_meet_is_refused_before_the_image_is_decoded(server: ServerProcess) -> None:
    """The cheapest refusal under overload: the 504 comes before decoding, so a body that is no image
    gets it too (v2 REST here; /classify the same), with the budget and exit 1's need in its message."""
    import httpx

    headers = {"content-type": "image/png", "x-deadline-ms": "5"}
    r = httpx.post(f"{server.url}/classify", content=b"not an image", headers=headers)
    assert r.status_code == 504 and "exit 1 needs about" in r.json()["error"]["message"]
    assert "of the 5.0 ms budget" in r.json()["error"]["message"]
    not_png = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"not a png").decode()]}
    body: dict[str, Any] = {"parameters": {"deadline_ms": 5}, "inputs": [not_png]}
    r = httpx.post(f"{server.url}/v2/models/m/infer", content=json.dumps(body))
    assert r.status_code == 504 and r.json()["code"] == "deadline_exceeded"
    body["parameters"] = {"deadline_ms": 10_000}
    r = httpx.post(f"{server.url}/v2/models/m/infer", content=json.dumps(body))
    assert r.status_code == 400  # with time to spare, the image is looked at


def test_the_error_table_gives_every_kind_a_code_a_status_and_a_grpc_code() -> None:
    codes = [k.code for k in TABLE]
    assert len(codes) == len(set(codes)) >= 20
    for kind in TABLE:
        assert 400 <= kind.status < 600 and grpc.StatusCode[kind.grpc]
        assert v2_status(kind) == (400 if kind.status in (400, 415, 422) else kind.status)


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    make_artifact(tmp_path, "tiny", "test_tiny", thresholds=[0.5, 0.5, 0.0])
    return tmp_path


def _strip(body: bytes) -> Any:
    """A response body without the fields that differ between two identical requests (timings)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict):
        for key in ("latency_ms", "queue_ms"):
            data.pop(key, None)
    return data


def test_the_app_answers_alike_with_and_without_the_front_door(store: Path) -> None:
    settings = ServiceSettings(model_store=store, model_name="tiny", grpc_port=0, model_poll_s=0, warmup=False)
    as_json = json.dumps({"image": B64, "threshold": 1}).encode()
    requests = [
        ("POST", "/classify", PNG, {"content-type": "image/png"}, "top_k=3"),
        ("POST", "/classify", as_json, {"content-type": "application/json"}, ""),
        ("POST", "/v1/models/tiny/classify", PNG, {"content-type": "image/png"}, ""),
        ("POST", "/v1/models/tiny/versions/9/classify", PNG, {"content-type": "image/png"}, ""),
        ("POST", "/classify", b"not an image", {"content-type": "image/png"}, ""),
        ("POST", "/classify", PNG, {"content-type": "image/png"}, "max_exit=2.5"),
        ("POST", "/v2/models/tiny/infer", PNG, {"inference-header-content-length": "0"}, ""),
        ("POST", "/v2/models/nope/infer", PNG, {"inference-header-content-length": "0"}, ""),
        ("GET", "/classify", b"", {}, ""),
        ("GET", "/v2/models/tiny", b"", {}, ""),
    ]

    async def answers(front_door: bool) -> list[tuple[int, Any]]:
        torch.manual_seed(0)
        app, stack = build(settings, front_door=front_door)
        async with app.router.lifespan_context(app):
            return [
                (status, _strip(body))
                for status, body in [await asgi_request(stack, m, p, b, h, q) for m, p, b, h, q in requests]
            ]

    with_door, without = asyncio.run(answers(True)), asyncio.run(answers(False))
    assert with_door == without
    assert [s for s, _ in with_door] == [200, 200, 200, 404, 400, 422, 200, 404, 405, 200]


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.code = code
        raise RuntimeError(details)


def test_grpc_is_unavailable_like_http_when_the_engine_is_not_running(store: Path) -> None:
    settings = ServiceSettings(model_store=store, model_name="tiny", grpc_port=0, model_poll_s=0, warmup=False)
    registry = ModelRegistry(settings, Metrics(), torch.device("cpu"))
    registry.start_sync()
    model = registry.get()
    model.engine.stop(0)  # the worker thread ends: the engine is not alive
    assert not model.engine.alive

    async def scenario() -> tuple[int, grpc.StatusCode | None]:
        app, stack = build(settings, registry)
        async with app.router.lifespan_context(app):
            status, _ = await asgi_request(stack, "POST", "/classify", PNG, {"content-type": "image/png"})
            plane: DataPlane = app.state.plane
            request = pb.ModelInferRequest(model_name="tiny")
            request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(PNG)
            context = _Context()
            with pytest.raises(RuntimeError, match="not running"):
                await v2_grpc.InferenceServicer(plane).ModelInfer(request, context)
            return status, context.code

    status, code = asyncio.run(scenario())
    assert status == 503 and code == grpc.StatusCode.UNAVAILABLE


def test_docs_load_nothing_from_another_host(store: Path) -> None:
    settings = ServiceSettings(model_store=store, model_name="tiny", grpc_port=0, model_poll_s=0, warmup=False)

    async def scenario() -> tuple[str, list[int]]:
        app, stack = build(settings)
        async with app.router.lifespan_context(app):
            status, html = await asgi_request(stack, "GET", "/docs")
            assert status == 200
            text = html.decode()
            assets = re.findall(r'(?:src|href)="([^"]+)"', text)
            statuses = [(await asgi_request(stack, "GET", a))[0] for a in assets]
            return text, statuses

    html, statuses = asyncio.run(scenario())
    hosts = re.findall(r"https?://[^\s\"'<>]+", html)
    assert hosts == [], hosts
    assert statuses and set(statuses) == {200}


def test_probabilities_is_one_option_in_every_form_of_classify(server: ServerProcess) -> None:
    """The option added last (options, the /classify renderer and its schema: three files): every class's
    calibrated probability at the exit that answered, from the query or the JSON body."""
    import httpx

    r = httpx.post(
        f"{server.url}/classify",
        content=PNG,
        headers={"content-type": "image/png"},
        params={"probabilities": "true", "top_k": 2},
    )
    body = r.json()
    assert r.status_code == 200 and len(body["probabilities"]) == 10
    assert abs(sum(body["probabilities"]) - 1) < 1e-5
    assert body["top_k"][0]["probability"] == max(body["probabilities"])
    assert "probabilities" in httpx.post(f"{server.url}/classify", json={"image": B64, "probabilities": True}).json()
    assert "probabilities" not in httpx.post(f"{server.url}/classify", json={"image": B64}).json()
    assert _classify_query(server, probabilities="maybe") == (422, "invalid_option")


def test_an_answer_ready_after_its_deadline_is_a_504_counted_missed(tmp_path: Path) -> None:
    """Stage 1 takes 10 ms and the budget is 60 ms: answered in time, the deadline is met. With the event
    loop blocked for 150 ms while stage 1 runs, the same answer is ready only after the deadline (no margin
    covers a stalled loop): missed, and a 504 that says by how much, not a late 200."""
    make_artifact(tmp_path, "m", "test_sleepy", thresholds=[0.0, 1.0, 1.0, 0.0], stage_ms=[10] * 4)
    settings = ServiceSettings(model_store=tmp_path, model_name="m", grpc_port=0, model_poll_s=0, warmup=False)
    headers = {"content-type": "image/png", "x-deadline-ms": "60"}

    async def scenario() -> tuple[list[int], bytes, str]:
        app, stack = build(settings)
        async with app.router.lifespan_context(app):
            status, _ = await asgi_request(stack, "POST", "/classify", PNG, headers)
            request = asyncio.create_task(asgi_request(stack, "POST", "/classify", PNG, headers))
            await asyncio.sleep(0.002)  # the request is in the engine, stage 1 running
            time.sleep(0.15)  # the event loop stalls past the deadline
            late, body = await request
            _, page = await asgi_request(stack, "GET", "/metrics", b"", {})
            return [status, late], body, page.decode()

    statuses, body, page = asyncio.run(scenario())
    assert statuses == [200, 504]
    error = json.loads(body)["error"]
    assert error["code"] == "deadline_exceeded" and "after the deadline" in error["message"], error
    for outcome in ("met", "missed"):
        assert metric(page, "anytime_deadline_total", model="m", outcome=outcome) == 1, outcome
