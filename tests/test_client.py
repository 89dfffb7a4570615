"""The client and the load generator against real servers; exact statistics on a fixed log."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from client import AnytimeClient, AsyncAnytimeClient, BadInput, DeadlineExceeded, Overloaded, Result, Unreachable
from client.loadgen import main as bench_main
from client.stats import Record, attainment, percentile, summarize
from tests.helpers import ServerProcess, make_artifact

IMAGE = Image.new("L", (28, 28), 100)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("client")
    make_artifact(store, "tiny", "test_tiny")
    srv = ServerProcess(store, "tiny").wait_ready()
    yield srv
    assert srv.stop() == 0


def test_sync_and_async_clients_classify_paths_bytes_and_pil(tiny: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    IMAGE.save(path)
    with AnytimeClient(tiny.url) as client:
        a = client.classify(path, deadline_ms=5000, top_k=3)
        b = client.classify(path.read_bytes())
        c = client.classify(IMAGE, threshold=1)
    assert a.index == b.index and len(a.top_k) == 3 and c.exit == c.exits == 3 and c.reason == "final"
    assert a.round_trip_ms >= a.latency_ms > 0

    async def go() -> int:
        async with AsyncAnytimeClient(tiny.url, deadline_ms=5000) as client:
            results = await asyncio.gather(*(client.classify(IMAGE, max_exit=2, threshold=1) for _ in range(5)))
        return {r.exit for r in results}.pop()

    assert asyncio.run(go()) == 2


def test_bad_input_raises_bad_input(tiny: ServerProcess) -> None:
    with AnytimeClient(tiny.url) as client:
        with pytest.raises(BadInput) as err:
            client.classify(b"\x89PNG not really")
        assert err.value.status == 400 and err.value.code == "undecodable_image"
        with pytest.raises(BadInput) as err:
            client.classify(IMAGE, threshold=7)
        assert err.value.status == 422


def test_504_and_client_timeout_raise_deadline_exceeded(tmp_path: Path) -> None:
    # Stages really take 150 ms; the manifest claims 1 ms, so the server admits a 60 ms deadline and then,
    # having reached no exit by then, answers 504 at the deadline rather than late.
    make_artifact(tmp_path, "slow", "test_sleepy", [1.0] * 3 + [0.0], stage_ms=[150] * 4, profile_ms=[1] * 4)
    make_artifact(tmp_path, "honest", "test_sleepy", [1.0] * 3 + [0.0], stage_ms=[150] * 4)
    slow = ServerProcess(tmp_path, "slow", warmup="false").wait_ready()
    honest = ServerProcess(tmp_path, "honest", warmup="false").wait_ready()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    try:
        with AnytimeClient(f"http://127.0.0.1:{silent.getsockname()[1]}", deadline_ms=60, timeout_margin_ms=40) as c:
            with pytest.raises(DeadlineExceeded, match=r"no answer within \d+ ms") as err:
                c.classify(IMAGE)
            assert err.value.status is None  # the client gave up; the server never answered
        with AnytimeClient(slow.url, deadline_ms=60, timeout_margin_ms=500) as client:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded) as err:
                client.classify(IMAGE, threshold=1)
            assert err.value.status == 504 and "no exit was reached" in str(err.value)
            assert time.monotonic() - t0 < 0.120  # at the deadline, not after the 150 ms stage
        with AnytimeClient(honest.url) as client:
            with pytest.raises(DeadlineExceeded) as err:
                client.classify(IMAGE, deadline_ms=50)
            assert err.value.status == 504 and err.value.code == "deadline_exceeded"
    finally:
        silent.close()
        assert slow.stop() == 0 and honest.stop() == 0


def test_503_raises_overloaded_with_retry_after(tmp_path: Path) -> None:
    make_artifact(tmp_path, "sleepy", "test_sleepy", [1.0] * 3 + [0.0], stage_ms=[80] * 4)
    srv = ServerProcess(tmp_path, "sleepy", max_batch=1, max_wait_ms=0, queue_size=1, warmup="false").wait_ready()

    async def flood() -> list[BaseException | object]:
        async with AsyncAnytimeClient(srv.url, retries=0) as client:
            return await asyncio.gather(*(client.classify(IMAGE) for _ in range(20)), return_exceptions=True)

    try:
        outcomes = asyncio.run(flood())
    finally:
        assert srv.stop() == 0
    overloaded = [o for o in outcomes if isinstance(o, Overloaded)]
    assert overloaded and all(o.retry_after == 1.0 and o.status == 503 for o in overloaded)
    assert len(overloaded) < 20


def test_client_retries_503_after_retry_after_when_the_deadline_allows(tmp_path: Path) -> None:
    # Four at once on a one-at-a-time server with a one-slot queue (4 x 80 ms a request): one or
    # two are admitted at first (two unless the second lands before the worker takes the first),
    # the others get 503 with Retry-After: 1.
    make_artifact(tmp_path, "sleepy", "test_sleepy", [1.0] * 3 + [0.0], stage_ms=[80] * 4)
    srv = ServerProcess(tmp_path, "sleepy", max_batch=1, max_wait_ms=0, queue_size=1, warmup="false").wait_ready()

    async def four(deadline_ms: float, retries: int) -> list[BaseException | object]:
        async with AsyncAnytimeClient(srv.url, deadline_ms=deadline_ms, retries=retries) as client:
            return await asyncio.gather(*(client.classify(IMAGE) for _ in range(4)), return_exceptions=True)

    try:
        patient = asyncio.run(four(5000, 3))
        hurried = asyncio.run(four(900, 2))  # Retry-After (1 s) does not fit: no retry
    finally:
        assert srv.stop() == 0
    assert all(isinstance(r, Result) for r in patient), patient
    attempts = sorted(r.attempts for r in patient)
    assert attempts[0] == 1 and 2 <= attempts[-1] <= 4, attempts  # retries=3: 4 attempts at most
    assert all(r.round_trip_ms >= 1000 for r in patient if r.attempts >= 2)
    refused = [r for r in hurried if isinstance(r, Overloaded)]
    answered = [r for r in hurried if isinstance(r, Result)]
    assert len(refused) in (2, 3) and len(refused) + len(answered) == 4, hurried
    assert all(r.attempts == 1 for r in refused + answered)


def test_client_retries_a_refused_connection_within_its_deadline(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        with AnytimeClient(url, retries=3, retry_backoff_ms=20) as client:
            with pytest.raises(Unreachable) as err:
                client.classify(IMAGE, deadline_ms=5000)
            assert err.value.attempts == 4 and err.value.status is None
            start = time.perf_counter()
            with pytest.raises(Unreachable) as err, AnytimeClient(url, retries=50, retry_backoff_ms=100) as eager:
                eager.classify(IMAGE, deadline_ms=300)
            assert time.perf_counter() - start < 0.5 and 1 < err.value.attempts < 5  # stops at the deadline
    # A server that is still starting (it listens once its model is warm): retries until it answers.
    make_artifact(tmp_path, "tiny", "test_tiny")
    srv = ServerProcess(tmp_path, "tiny")
    try:
        with AnytimeClient(srv.url, retries=30, retry_backoff_ms=100) as client:
            result = client.classify(IMAGE, deadline_ms=60_000)
    finally:
        assert srv.stop() == 0
    assert result.attempts > 1 and result.label


def test_statistics_are_exact_on_a_fixed_log() -> None:
    records = [Record(t=i * 0.1, latency_ms=float(i + 1), status=200, exit=1 + i % 2, reason="confidence",
                      correct=i % 4 != 0, deadline_ms=50.0) for i in range(100)]  # fmt: skip
    records.append(Record(t=10.0, latency_ms=5.0, status=504, deadline_ms=1.0))
    records.append(Record(t=10.1, latency_ms=30000.0, status=0))
    assert percentile([float(i + 1) for i in range(100)], 50) == 50.5
    assert percentile([float(i + 1) for i in range(100)], 99) == pytest.approx(99.01)
    assert percentile([3.0], 95) == 3.0 and math.isnan(percentile([], 50))
    s = summarize(records, duration_s=10.0)
    assert s["requests"] == 102 and s["ok"] == 100 and s["status_counts"] == {"0": 1, "200": 100, "504": 1}
    assert s["throughput_rps"] == 10.0
    assert s["latency_ms"]["p50"] == 50.5 and s["latency_ms"]["mean"] == 50.5
    assert s["accuracy"] == 0.75 and s["exit_distribution"] == {"1": 0.5, "2": 0.5}
    assert attainment(records) == 50 / 101  # latencies 1..50 ms meet 50 ms; the 504 misses
    assert s["deadline_attainment"] == 50 / 101


def test_a_short_bench_run_writes_json_and_png(
    tiny: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--url", tiny.url, "--rate", "40", "--duration", "2", "--requests", "200", "--images", "20"]
    args += ["--deadline-ms", "200", "1000", "--name", "short", "--out", str(tmp_path), "--no-progress"]
    code = bench_main(args)
    assert code == 0
    data = json.loads((tmp_path / "short.json").read_text())
    assert 10 <= data["summary"]["requests"] <= 200 and data["summary"]["ok"] > 0
    assert {r["deadline_ms"] for r in data["records"]} <= {200.0, 1000.0}
    assert (tmp_path / "short.png").read_bytes()[:4] == b"\x89PNG"
    assert "throughput" in capsys.readouterr().out


def test_bench_refuses_non_loopback_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--url", "http://10.0.0.1:8000", "--duration", "1"]) == 2
    assert "non-loopback" in capsys.readouterr().err
