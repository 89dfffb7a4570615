"""Deadlines over HTTP: the first request after ready is warm, refusals come at once and say where the
budget went, and no answer comes after its deadline (the anytime answer from the last exit passed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from PIL import Image

from tests.helpers import ROOT, ServerProcess, make_artifact, png_bytes, ready_late

PNG = png_bytes(Image.new("L", (28, 28), 90))
HEADERS = {"content-type": "image/png"}


def _first_request_is_warm(log_dir: Path) -> tuple[bool, str]:
    """Start a fresh server; send its first request with a 50 ms budget, then nine more after the same
    pauses: whether the first was answered in time and as fast as the others."""
    srv = ServerProcess(ROOT / "model_store", "fashion-mnist", log_dir=log_dir).wait_ready()
    try:
        exit1_ms = httpx.get(f"{srv.url}/v1/model").json()["stage_ms_now"][0]["1"]
        budget = 50.0
        latencies = []
        for i in range(10):
            time.sleep(0.2)
            headers = {**HEADERS, "x-deadline-ms": f"{budget:.3f}"} if i == 0 else HEADERS
            r = httpx.post(f"{srv.url}/classify", content=PNG, headers=headers)
            if r.status_code != 200:
                return False, f"request {i + 1} with {budget:.1f} ms: {r.status_code} {r.text}"
            latencies.append(r.json()["latency_ms"])
        detail = f"exit 1 {exit1_ms:.2f} ms; latency of requests 1-10 after 200 ms pauses: {latencies}"
        return latencies[0] <= 1.5 * sorted(latencies[1:])[4] + 0.5, detail  # the first as fast as the others
    finally:
        assert srv.stop() == 0


def test_a_fresh_server_answers_its_first_request_as_fast_as_the_tenth(tmp_path: Path) -> None:
    """Warm-up runs the whole request path of every protocol, in process and over the server's own socket,
    before /readyz says ready: the first request is as fast as the tenth. Each request comes after the same
    pause, since a request after an idle pause costs more than one in a busy stream, by how much depends on
    the VM: 1 ms on an AMD EPYC VM; on an Intel Xeon VM with the haltpoll idle driver 1.7 ms one day and
    6 ms another (exit 1 at 0.7 ms back to back; 9.3 ms went before the engine for a first request in CI).
    So the warm-up is judged against the later requests, not against a fixed deadline: a cold request path
    is slow on every start (8-12 ms before the warm-up covered it); the first request's budget (50 ms) only
    checks that admission does not refuse it on estimates the warm-up left behind. A stall of the VM is
    not slow on every start, so up to three fresh servers are tried (1 start in 8 of the same code missed
    by such a stall, 2026-11-29)."""
    attempts = []
    for _ in range(3):
        ok, detail = _first_request_is_warm(tmp_path)
        attempts.append(detail)
        print(detail)
        if ok:
            break
    assert ok, attempts


def test_the_requests_right_after_ready_are_not_charged_for_the_start_up(tmp_path: Path, workers: int) -> None:
    """Readiness comes after the warm-up over the socket and the heap freeze, which block the event loop
    for 50-200 ms; the loop's lag timer was running (the warm-up's requests asked for it), and counting
    that stall as every request's wait for the next 50 ms refused the first clients' requests as if their
    deadline had passed before they arrived (about 30 of the first 700 req/s, 2026-12-04)."""
    srv = ServerProcess(ROOT / "model_store", "fashion-mnist", log_dir=tmp_path, workers=workers).wait_ready()
    try:
        refused = []
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            for _ in range(40):  # at once: within the lag's 50 ms window and after it
                t0 = time.perf_counter()
                r = client.post("/classify", content=PNG, headers={**HEADERS, "x-deadline-ms": "30"})
                took_ms = (time.perf_counter() - t0) * 1e3
                if r.status_code != 200:
                    refused.append(f"{r.status_code} after {took_ms:.1f} ms: {r.text}")
        assert not [r for r in refused if "passed before the engine" in r], refused
    finally:
        assert srv.stop() == 0


def test_refusals_come_at_once_and_no_answer_comes_after_its_deadline(tmp_path: Path, workers: int) -> None:
    """Stages sleep 60 ms (the liar's later ones 200 ms) but the liar's manifest says 1 ms. Four full-depth
    requests occupy the engine; then a request with 100 ms is refused at once (the queue ahead is known),
    and one with a deadline that its exit 1 makes is answered from exit 1 at the deadline, while stage 2
    still runs."""
    make_artifact(tmp_path, "sleepy", "test_sleepy", thresholds=[1.0, 1.0, 1.0, 0.0], stage_ms=[60] * 4)
    make_artifact(
        tmp_path,
        "liar",
        "test_sleepy",
        thresholds=[1.0, 1.0, 1.0, 0.0],
        stage_ms=[60, 200, 200, 200],
        profile_ms=[1] * 4,
    )
    honest = ServerProcess(tmp_path, "sleepy", max_batch=1, warmup="false", workers=workers).wait_ready()
    liar = ServerProcess(tmp_path, "liar", max_batch=1, warmup="false", workers=workers).wait_ready()
    try:

        async def scenario() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(base_url=honest.url, timeout=30) as client:
                busy = [asyncio.create_task(client.post("/classify", content=PNG, headers=HEADERS)) for _ in range(4)]
                await asyncio.sleep(0.1)
                t0 = time.perf_counter()
                refused = await client.post("/classify", content=PNG, headers={**HEADERS, "x-deadline-ms": "100"})
                took = time.perf_counter() - t0
                await asyncio.gather(*busy)
                return refused, took

        refused, took = asyncio.run(scenario())
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded", refused.text
        assert "exit 1 is predicted" in refused.json()["error"]["message"] and refused.headers["retry-after"]
        assert took < 0.05  # refused at admission, not after waiting in line
        too_short = httpx.post(f"{honest.url}/classify", content=PNG, headers={**HEADERS, "x-deadline-ms": "20"})
        message = too_short.json()["error"]["message"]
        assert too_short.status_code == 504 and "of the 20.0 ms budget" in message and "exit 1 needs about" in message
        # 150 ms: exit 1 at 60 ms leaves room for the first job of a server without warm-up, whose cold path
        # over an engine process's link took 18 ms more (a fresh-clone CI run missed 90 ms once, 2026-12-01)
        # and, on a VM whose host took the cores now and then, over 45 (105 ms missed in 2 of 3, 2026-12-06).
        # A stall across the answer margin (7.5 ms here) makes the answer ready after the deadline: refused
        # (504), not sent late, which is the promise kept; the request is then sent once more.
        for _ in range(2):
            t0 = time.perf_counter()
            answered = httpx.post(f"{liar.url}/classify", content=PNG, headers={**HEADERS, "x-deadline-ms": "150"})
            took = time.perf_counter() - t0
            if not ready_late(answered):
                break
            time.sleep(0.5)  # stage 2 (200 ms) finishes
        body = answered.json()
        assert answered.status_code == 200 and (body["exit"], body["reason"]) == (1, "deadline"), body
        assert body["latency_ms"] <= 150 + 2 and took < 0.25  # at the deadline, not after stage 2 (at 260 ms)
    finally:
        assert honest.stop() == 0 and liar.stop() == 0
