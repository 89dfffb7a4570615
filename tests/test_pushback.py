"""Clients that resend at once after a refusal, and the event loop's lag: the pushback that keeps a retry
loop without backoff from turning the server's time into refusals (service/pushback.py), and the lag
that counts a request's budget from before the loop could read it (service/loop_lag.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.app import build
from service.config import ServiceSettings
from service.loop_lag import LoopLag
from service.pushback import Pushback, fingerprint
from service.warmup import asgi_request
from tests.helpers import ServerProcess, make_artifact, metric, png_bytes

PNG = png_bytes(Image.new("L", (28, 28), 90))
OTHER_PNG = png_bytes(Image.new("L", (28, 28), 200))
CLIENT = ("127.0.0.1", 50_000)


A, B = fingerprint("/classify", [b"image a"]), fingerprint("/classify", [b"image b"])


def _resend(p: Pushback, start: float, request: int = A, client: tuple[str, int] = CLIENT) -> tuple[int, float]:
    """A request on `client` at `start`: (its count of resends at once, how long its refusal is held)."""
    return p.resent(client, start, request)


def test_a_request_resent_at_once_twice_in_a_row_is_held_and_the_one_after_is_attempted() -> None:
    held: list[int] = []
    p = Pushback(0.2, at_once_s=1e-3, held=lambda: held.append(1))
    assert _resend(p, 10.0) == (0, 0.0)  # nothing refused yet
    p.answered(CLIENT, 503, 10.0, False, A, 0)
    assert _resend(p, 10.0005) == (1, 0.0)  # the same request at once, the first time: attempted
    p.answered(CLIENT, 504, 10.001, False, A, 1)  # a 504 is a refusal too
    resends, hold = _resend(p, 10.0015)
    assert resends == 2 and 0.1 <= hold <= 0.3  # at once, twice in a row: held (0.5-1.5x hold_s)
    p.answered(CLIENT, 503, 10.2, True, A, 2)
    assert _resend(p, 10.2001) == (3, 0.0)  # after a held refusal: a real attempt
    p.answered(CLIENT, 503, 10.201, False, A, 3)
    assert _resend(p, 10.2012)[1] > 0  # and held again
    assert held == [1, 1]


def test_holds_are_spread_so_that_connections_refused_together_do_not_return_together() -> None:
    p = Pushback(0.2, at_once_s=1e-3)
    holds = []
    for port in range(400):  # a burst: 400 connections resend at once twice, in the same millisecond
        client = ("127.0.0.1", port)
        p.answered(client, 503, 10.0, False, A, 0)
        p.answered(client, 503, 10.0, False, A, 1)
        holds.append(_resend(p, 10.0005, client=client)[1])
    assert 0.1 <= min(holds) < 0.11 and 0.29 < max(holds) <= 0.3, (min(holds), max(holds))
    assert sum(holds) / len(holds) == pytest.approx(0.2, abs=0.01)  # hold_s on average
    assert sum(h < 0.2 for h in holds) == pytest.approx(200, abs=40)  # uniform: half return early


def test_other_requests_later_ones_and_those_after_an_answer_are_not_held() -> None:
    p = Pushback(0.2, at_once_s=1e-3)
    p.answered(CLIENT, 503, 10.0, False, A, 0)
    assert _resend(p, 10.0005) == (1, 0.0)
    p.answered(CLIENT, 503, 10.001, False, A, 1)
    assert _resend(p, 10.003) == (0, 0.0)  # 2 ms later: the run of resends at once is broken
    p.answered(CLIENT, 503, 10.004, False, A, 0)
    assert _resend(p, 10.0041, B) == (0, 0.0)  # at once, but another image: a pooled client's next request
    p.answered(CLIENT, 503, 10.0042, False, B, 0)
    assert _resend(p, 10.0043, B) == (1, 0.0)  # that one resent at once: only once in a row
    assert _resend(p, 10.0043, B, ("127.0.0.1", 50_001)) == (0, 0.0)  # the same request on another connection
    p.answered(CLIENT, 200, 10.005, False, 0, 0)
    assert _resend(p, 10.0051) == (0, 0.0)  # the last answer was no refusal
    assert fingerprint("/v2/models/m/infer", [b"image a"]) != A  # the path counts
    assert fingerprint("/classify", [b"image ", b"a"]) == A  # however the body arrived
    big = bytes(range(256)) * 1200  # 300 KiB: its length and first and last 64 KiB
    assert fingerprint("/classify", [big]) == fingerprint(
        "/classify", [big[i : i + 5000] for i in range(0, len(big), 5000)]
    )
    assert fingerprint("/classify", [big]) != fingerprint("/classify", [big + b"y"])  # another tail
    assert fingerprint("/classify", [big]) != fingerprint("/classify", [b"y" + big[1:]])  # another head
    assert Pushback(0.0).watch({"client": CLIENT}, None) is None  # off  # type: ignore[arg-type]


def test_the_loops_lag_widens_what_counts_as_at_once_and_the_table_stays_bounded() -> None:
    lag = [0.0]
    p = Pushback(0.2, at_once_s=1e-3, lag=lambda: lag[0], size=4)
    p.answered(CLIENT, 503, 10.0, False, A, 0)
    assert _resend(p, 10.01) == (0, 0.0)  # 10 ms apart: not at once
    p.answered(CLIENT, 503, 10.02, False, A, 0)
    lag[0] = 0.02  # the loop reads 20 ms late: a request sent at once is read up to that late
    assert _resend(p, 10.03) == (1, 0.0)
    p.answered(CLIENT, 503, 10.03, False, A, 1)
    assert _resend(p, 10.04)[0] == 2
    for port in range(10):
        p.answered(("10.0.0.1", port), 503, 20.0 + port, False, A, 0)  # each older than a second by the next
    assert len(p._last) <= 4


def test_loop_lag_is_the_mean_lateness_over_its_window_or_the_wake_up_overdue() -> None:
    lag = LoopLag(period_s=0.002, window_s=0.05)
    assert lag.current() == 0.0  # idle: no lag, and the timer is wanted from now on
    now = time.monotonic()
    for i, late in enumerate([0.0, 0.004, 0.002]):
        lag.sample(now - 2e-3 + i * 1e-3, now - 2e-3 + i * 1e-3 - late)  # the last one just now
    assert lag.current() == pytest.approx(0.002, abs=5e-4)
    lag.sample(now + 1.0, now + 1.0)  # a second later, on time: the old samples leave the window
    assert lag.current() == 0.0
    stalled = LoopLag(period_s=0.002)
    stalled._last = time.monotonic() - 0.1  # the loop has not woken for 100 ms
    assert stalled.current() >= 0.09


def test_the_lag_timer_runs_only_while_requests_come() -> None:
    async def scenario() -> tuple[int, int, float]:
        lag = LoopLag(period_s=0.002, window_s=0.02)
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.05)
        idle = len(lag._samples)  # nobody asked: no timer
        lag.current()
        await asyncio.sleep(0.05)
        busy = len(lag._samples)
        task.cancel()
        return idle, busy, lag.current()

    idle, busy, now = asyncio.run(scenario())
    assert idle == 0 and busy >= 3 and now < 0.05


def test_forgetting_drops_the_stall_in_progress() -> None:
    """Readiness forgets the start-up's stalls, including the one the timer is sleeping through."""

    async def scenario() -> tuple[float, float]:
        lag = LoopLag(period_s=0.002, window_s=0.05)
        task = asyncio.create_task(lag.run())
        lag.current()
        await asyncio.sleep(0.01)
        time.sleep(0.1)  # the heap freeze: the loop stalls while the timer sleeps
        lag.forget()
        forgotten = lag.current()
        await asyncio.sleep(0.01)  # the timer wakes 100 ms late, but from before the forgetting
        after = lag.current()
        task.cancel()
        return forgotten, after

    forgotten, after = asyncio.run(scenario())
    assert forgotten == 0.0 and after < 0.02, (forgotten, after)


def test_a_client_resending_at_once_gets_held_refusals_between_attempts(tmp_path: Path, workers: int) -> None:
    # Exit 1 takes 25 ms: a 5 ms budget is refused at once (504) before decoding. "At once" is 50 ms
    # here so that the test's own client, slow on a loaded machine, counts as resending at once.
    make_artifact(tmp_path, "sleepy", "test_sleepy", [1.0] * 3 + [0.0], stage_ms=[25] * 4)
    hold_ms = 600  # held 300-900 ms: apart from the attempts refused at once
    srv = ServerProcess(
        tmp_path, "sleepy", warmup="false", workers=workers, resend_hold_ms=hold_ms, resend_at_once_ms=50
    ).wait_ready()
    tight = {"content-type": "image/png", "x-deadline-ms": "5"}
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as client:  # one keep-alive connection
            statuses, seconds, bodies = [], [], []
            for _ in range(5):
                t0 = time.monotonic()
                r = client.post("/classify", content=PNG, headers=tight)
                statuses.append(r.status_code)
                seconds.append(time.monotonic() - t0)
                bodies.append(r.json()["error"])
            held = bodies[2]
            answered = client.post("/classify", content=PNG, headers={"content-type": "image/png"})
            pooled = []  # a pooled client's next requests: other images at once after each refusal
            for png in (PNG, OTHER_PNG, PNG, OTHER_PNG):
                t0 = time.monotonic()
                pooled.append((client.post("/classify", content=png, headers=tight).status_code, time.monotonic() - t0))
            v2 = client.post(
                "/v2/models/sleepy/infer",
                json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
                      "parameters": {"deadline_ms": 5}},
            )  # fmt: skip
        with httpx.Client(base_url=srv.url, timeout=10) as other:  # a new connection is not held
            t0 = time.monotonic()
            fresh = other.post("/classify", content=PNG, headers=tight)
            fresh_s = time.monotonic() - t0
        page = httpx.get(f"{srv.url}/metrics").text
    finally:
        assert srv.stop() == 0
    assert statuses == [504, 504, 503, 504, 503], (statuses, bodies)
    assert held["code"] == "overloaded" and "resent at once" in held["message"], held
    assert min(seconds[2], seconds[4]) >= hold_ms / 2e3 * 0.95, seconds  # held 0.5-1.5x hold_ms
    assert max(seconds[0], seconds[1], seconds[3]) < 0.2, seconds  # the attempts are refused at once
    assert answered.status_code == 200  # the request after a held refusal is served as usual
    assert [code for code, _ in pooled] == [504] * 4 and max(t for _, t in pooled) < 0.2, pooled  # none held
    assert v2.status_code in (400, 504), v2.text  # the v2 route goes through the same door
    assert fresh.status_code == 504 and fresh_s < 0.2
    assert metric(page, "anytime_resend_holds_total") == 2
    assert metric(page, "anytime_requests_total", status="503") == 2
    assert metric(page, "anytime_event_loop_lag_seconds") is not None


def test_a_request_read_after_a_stalled_loop_has_its_budget_counted_from_before(tmp_path: Path) -> None:
    """The event loop stalls 300 ms while a request with a 200 ms budget waits to be read: the budget is
    spent by the time the handler runs, so it is refused 504 before the engine, not answered after the
    client's deadline. The same request on a loop that keeps time is answered."""
    make_artifact(tmp_path, "m", "test_sleepy", thresholds=[0.0, 1.0, 1.0, 0.0], stage_ms=[5] * 4)
    settings = ServiceSettings(model_store=tmp_path, model_name="m", grpc_port=0, model_poll_s=0, warmup=False)
    headers = {"content-type": "image/png", "x-deadline-ms": "200"}

    async def scenario() -> tuple[int, int, bytes]:
        app, stack = build(settings)
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.05)  # the lag timer is running
            on_time, _ = await asgi_request(stack, "POST", "/classify", PNG, headers)
            asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # the loop stalls before it reads the request
            late, body = await asyncio.create_task(asgi_request(stack, "POST", "/classify", PNG, headers))
            return on_time, late, body

    on_time, late, body = asyncio.run(scenario())
    assert on_time == 200
    assert late == 504 and b"deadline passed before the engine" in body, body
