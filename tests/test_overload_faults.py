"""Overload, faults and bad artifacts against real servers: only 200/503/504, nothing lost, no 500
except for a batch the model itself failed, and a clear exit when the artifact is bad."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers import ROOT, ServerProcess, make_artifact, metric, png_bytes

PNG = png_bytes(Image.new("L", (28, 28), 60))
BRIGHT = png_bytes(Image.new("L", (28, 28), 255))


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_twenty_times_saturation_gives_only_200_503_504(tmp_path: Path, workers: int) -> None:
    # Saturation is about 20 req/s: each batch of at most 2 takes 4 x 25 ms.
    make_artifact(tmp_path, "sleepy", "test_sleepy", [1.0] * 3 + [0.0], stage_ms=[25] * 4)
    srv = ServerProcess(tmp_path, "sleepy", max_batch=2, queue_size=8, warmup="false", workers=workers).wait_ready()
    baseline = _rss_kb(srv.proc.pid)
    rate, seconds = 400.0, 5.0  # 20x saturation

    async def run() -> list[tuple[int, float]]:
        results: list[tuple[int, float]] = []
        limits = httpx.Limits(max_connections=500)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as client:

            async def one(deadline: bool) -> None:
                headers = {"content-type": "image/png", **({"x-deadline-ms": "300"} if deadline else {})}
                t0 = time.monotonic()
                try:
                    r = await client.post("/classify", content=PNG, headers=headers)
                    results.append((r.status_code, time.monotonic() - t0))
                except httpx.HTTPError:
                    results.append((-1, time.monotonic() - t0))

            tasks, start, n = [], time.monotonic(), int(rate * seconds)
            for i in range(n):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                tasks.append(asyncio.create_task(one(deadline=i % 2 == 0)))
            await asyncio.gather(*tasks)
        return results

    stop = threading.Event()

    def probe() -> None:
        """/healthz from its own thread, so the load loop's own lag does not count against the server."""
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            while not stop.is_set():
                t0 = time.monotonic()
                r = client.get("/healthz")
                health.append(time.monotonic() - t0 if r.status_code == 200 else float("inf"))
                stop.wait(0.2)

    health: list[float] = []
    prober = threading.Thread(target=probe)
    prober.start()
    try:
        results = asyncio.run(run())
        stop.set()
        prober.join()
        time.sleep(1.0)
        after = _rss_kb(srv.proc.pid)
        page = httpx.get(f"{srv.url}/metrics").text
    finally:
        stop.set()
        assert srv.stop() == 0
    statuses = [s for s, _ in results]
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"overload at {rate:.0f} req/s for {seconds:.0f} s: {counts}; healthz max {max(health) * 1e3:.0f} ms")
    assert len(results) == int(rate * seconds)  # every request got an answer
    assert set(counts) <= {200, 503, 504} and counts.get(200, 0) > 0 and counts.get(503, 0) > 0
    # The queue bounds an answer's time on the server's clock (8 queued + 2 running, 100 ms a batch).
    # The client's clock also counts the kernel's accept queue, which on a slow two-core machine
    # fills at 400 req/s with several request processes: it is no measure of the engine's queue.
    answered = metric(page, "anytime_exit_latency_seconds_count")
    within = metric(page, "anytime_exit_latency_seconds_bucket", le="1.0")
    assert answered and within is not None and within >= 0.99 * answered, (within, answered)
    assert len(health) >= 5 and max(health) < 3.0  # answered all along, never stuck behind the queue
    assert after < baseline * 1.3 + 50_000, (baseline, after)


@pytest.mark.slow
def test_after_an_overload_burst_the_server_serves_normally_within_two_seconds(tmp_path: Path, workers: int) -> None:
    """The issue's recovery test end to end, in both process models: stages sleep 5 ms, one row per run,
    and every request goes to exit 4 (about 50 req/s). One request every 100 ms (a fifth of the capacity)
    for 1.5 s shows how this machine serves when calm; then a burst of 600 requests with 60 ms budgets,
    sent as fast as the client can (several times the capacity), is largely refused; then one request
    every 100 ms again: every one of them sent 2 s or more after the burst's last answer is a 200 within
    its budget, or, on a VM so slow that calm requests take longer, within the slowest calm one's time.
    (In CI on such a VM, requests 2 s after the burst were 200s in 61-76 ms by the client's clock.)"""
    make_artifact(tmp_path, "sleepy", "test_sleepy", thresholds=[1.0, 1.0, 1.0, 0.0], stage_ms=[5] * 4)
    srv = ServerProcess(tmp_path, "sleepy", max_batch=1, warmup="false", workers=workers).wait_ready()
    headers = {"content-type": "image/png", "x-deadline-ms": "60"}
    Paced = list[tuple[float, int, float]]

    async def scenario() -> tuple[Paced, list[int], float, Paced]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as client:

            async def one() -> tuple[int, float]:
                t0 = time.monotonic()
                r = await client.post("/classify", content=PNG, headers=headers)
                return r.status_code, time.monotonic() - t0

            async def paced(seconds: float) -> Paced:
                """One request every 100 ms for `seconds`: (sent after, status, took)."""
                out, begun = [], time.monotonic()
                while time.monotonic() - begun < seconds:
                    status, took = await one()
                    out.append((time.monotonic() - begun, status, took))
                    await asyncio.sleep(0.1)
                return out

            calm = (await paced(1.6))[1:]  # the first pays the cold path of a server without warm-up
            burst, start = [], time.monotonic()
            for i in range(600):  # as fast as the client sends them, up to 1,000 req/s
                await asyncio.sleep(max(0.0, start + i / 1000 - time.monotonic()))
                burst.append(asyncio.create_task(one()))
            sent_in = time.monotonic() - start
            statuses = [s for s, _ in await asyncio.gather(*burst)]
            return calm, statuses, sent_in, await paced(4.0)

    try:
        calm, statuses, sent_in, after = asyncio.run(scenario())
        model = httpx.get(f"{srv.url}/v1/model", timeout=10).json()
    finally:
        assert srv.stop() == 0
    counts = {s: statuses.count(s) for s in set(statuses)}
    assert [s for _, s, _ in calm] == [200] * len(calm), calm  # a calm server answers every request
    limit_ms = max(60 + 5, max(took for _, _, took in calm) * 1e3 + 5)
    settled = [(round(t, 2), s, round(took * 1e3, 1)) for t, s, took in after if t >= 2.0]
    missed = [(t, s, ms) for t, s, ms in settled if s != 200 or ms > limit_ms]
    early = [s for t, s, _ in after if t < 2.0]
    print(f"calm: {len(calm)} answered in {sorted(round(took * 1e3, 1) for _, _, took in calm)} ms; "
          f"burst of {len(statuses)} in {sent_in:.2f} s: {counts}; in the 2 s after it {early.count(200)} of "
          f"{len(early)} answered, then {len(settled) - len(missed)} of {len(settled)} within {limit_ms:.1f} ms; "
          f"in-flight limit {model['in_flight_limit']:.1f}, stage 1 now {model['stage_ms_now'][0]}")  # fmt: skip
    # An overload: a quarter or more refused, not half, since a slower client sends the burst at a lower
    # rate and more of it is answered at its deadline from an earlier exit.
    assert set(counts) <= {200, 503, 504} and counts.get(200, 0) <= 0.75 * len(statuses), counts
    assert len(settled) >= 10 and not missed, missed


def test_a_failing_batch_answers_500_and_the_server_keeps_serving(tmp_path: Path) -> None:
    make_artifact(tmp_path, "faulty", "test_faulty")
    srv = ServerProcess(tmp_path, "faulty").wait_ready()
    try:
        bad = httpx.post(f"{srv.url}/classify", content=BRIGHT, headers={"content-type": "image/png"})
        assert bad.status_code == 500
        assert bad.json()["error"] == {"code": "inference_failed", "message": "inference failed: RuntimeError"}
        for _ in range(3):
            assert (
                httpx.post(f"{srv.url}/classify", content=PNG, headers={"content-type": "image/png"}).status_code == 200
            )
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "anytime_requests_total", model="faulty", version="1", status="500") == 1.0
    finally:
        assert srv.stop() == 0


def test_clients_that_hang_up_do_not_leak_queue_slots(tmp_path: Path) -> None:
    make_artifact(tmp_path, "sleepy", "test_sleepy", [1.0] * 3 + [0.0], stage_ms=[50] * 4)
    srv = ServerProcess(tmp_path, "sleepy", max_batch=1, queue_size=3, warmup="false").wait_ready()

    async def hang_up(n: int) -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=0.02) as client:
            await asyncio.gather(*(client.post("/classify", content=PNG, headers={"content-type": "image/png"})
                                   for _ in range(n)), return_exceptions=True)  # fmt: skip

    try:
        for _ in range(3):  # three rounds of clients that give up after 20 ms
            asyncio.run(hang_up(4))
        time.sleep(1.5)  # what they left in the queue drains
        for _ in range(3):
            r = httpx.post(f"{srv.url}/classify", content=PNG, headers={"content-type": "image/png"}, timeout=10)
            assert r.status_code == 200, r.text
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "anytime_queue_depth", model="sleepy") == 0.0
        assert metric(text, "anytime_requests_total", status="500") is None  # a client hanging up is no server error
    finally:
        assert srv.stop() == 0


def _serve(store: Path, name: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANYTIME_MODEL_STORE": str(store), "ANYTIME_MODEL_NAME": name,
           "ANYTIME_PORT": "0"}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "service.main"], env=env, capture_output=True, text=True, timeout=60)


def test_missing_or_corrupt_artifact_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    missing = _serve(tmp_path, "nothing-here")
    assert missing.returncode == 2 and "No artifact named 'nothing-here'" in missing.stderr
    path = make_artifact(tmp_path, "tiny", "test_tiny")
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    corrupt = _serve(tmp_path, "tiny")
    assert corrupt.returncode == 2 and "does not match its manifest" in corrupt.stderr
    (path / "manifest.json").write_text("{")
    truncated = _serve(tmp_path, "tiny")
    assert truncated.returncode == 2 and "not valid JSON" in truncated.stderr
    make_artifact(tmp_path, "tiny2", "test_tiny")
    several = _serve(tmp_path, "")  # no default named, and the store holds two models
    assert several.returncode == 2 and "holds 2 models (tiny, tiny2): set ANYTIME_MODEL_NAME" in several.stderr
    assert "Traceback" not in missing.stderr + corrupt.stderr + truncated.stderr + several.stderr
