"""Keeping stage 1 warm between requests (ANYTIME_KEEP_WARM_MS): when it runs, what it runs, when it stops."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import torch

from models.artifact import load_artifact
from service.config import ServiceSettings
from service.engine import Engine, EngineConfig, Job
from service.engine import worker as worker_module
from service.metrics import Metrics
from service.options import InferenceOptions
from service.served import engine_config
from tests.helpers import make_artifact


def _engine(tmp_path: Path, keep_warm_ms: float, stage_ms: list[float] | None = None) -> Engine:
    """The tiny network, or the sleepy one whose stages take `stage_ms`."""
    network = "test_sleepy" if stage_ms else "test_tiny"
    artifact = load_artifact(make_artifact(tmp_path, "m", network, stage_ms=stage_ms))
    engine = Engine(
        artifact, torch.device("cpu"), Metrics().for_model("m", "1", "cpu"), EngineConfig(keep_warm_ms=keep_warm_ms)
    )
    engine.start(warmup=False)
    return engine


def _stage_inputs(engine: Engine) -> list[list[torch.Tensor]]:
    """Every input each stage runs on, as the worker runs it."""
    seen: list[list[torch.Tensor]] = [[] for _ in range(engine.num_exits)]
    for k, stage in enumerate(engine.model.stages):
        stage.register_forward_hook(lambda _m, inp, _o, k=k: seen[k].append(inp[0].detach().clone()))
    return seen


def _request(engine: Engine) -> None:
    """One request to the final exit, through the worker thread."""

    async def one() -> None:
        await engine.submit(Job(torch.rand(1, 28, 28) + 0.5, InferenceOptions.now(threshold=1.0)))

    asyncio.run(one())


def test_an_idle_worker_runs_stage_1_on_a_blank_input_while_requests_come_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 20 ms of idling after a request, stage 1 (and only stage 1) runs on one blank sample; none before
    the first request, and none once `KEEP_WARM_FOR_S` has passed since the last one."""
    monkeypatch.setattr(worker_module, "KEEP_WARM_FOR_S", 1.0)
    engine = _engine(tmp_path, keep_warm_ms=20)
    seen = _stage_inputs(engine)
    try:
        time.sleep(0.3)
        assert seen[0] == [], "kept warm before any request"
        _request(engine)
        assert [len(s) for s in seen] == [1] * engine.num_exits
        time.sleep(0.5)
        warm = seen[0][1:]
        assert len(warm) >= 5, f"{len(warm)} runs in 0.5 s at a 20 ms period"
        assert all(x.shape == (1, 1, 28, 28) and not x.any() for x in warm)
        assert [len(s) for s in seen[1:]] == [1] * (engine.num_exits - 1), "a keep-warm run went past stage 1"
        time.sleep(0.8)  # 1.3 s after the request
        settled = len(seen[0])
        time.sleep(0.3)
        assert len(seen[0]) == settled, "still kept warm after KEEP_WARM_FOR_S without requests"
        _request(engine)  # traffic again: warm again
        time.sleep(0.2)
        assert len(seen[0]) >= settled + 3
    finally:
        engine.stop(1.0)


def test_a_stage_1_longer_than_a_tenth_of_the_period_stretches_the_period(tmp_path: Path) -> None:
    """Stage 1 sleeps 8 ms: at a 10 ms period the keep-warm would take the core most of the time; stretched to
    ten times stage 1's estimate (about 80 ms), it takes a tenth of it."""
    engine = _engine(tmp_path, keep_warm_ms=10, stage_ms=[8, 1, 1, 1])
    seen = _stage_inputs(engine)
    try:
        _request(engine)
        time.sleep(0.5)
        warm = len(seen[0]) - 1
        assert 3 <= warm <= 8, f"{warm} keep-warm runs of 8 ms in 0.5 s"
    finally:
        engine.stop(1.0)


def test_waking_to_keep_warm_tells_admission_of_no_more_calm_moments_than_before(tmp_path: Path) -> None:
    """The brownout hears the idle worker after a request's step and once per `IDLE_WAIT_S` (50 ms), not on
    every 10 ms keep-warm wake-up."""
    engine = _engine(tmp_path, keep_warm_ms=10)
    calls: list[float] = []
    idle = engine.admission.idle
    engine.admission.idle = lambda now: (calls.append(now), idle(now))[1]  # type: ignore[method-assign]
    seen = _stage_inputs(engine)
    try:
        _request(engine)
        calls.clear()
        time.sleep(0.5)
        assert len(seen[0]) >= 10, "not kept warm"
        assert 5 <= len(calls) <= 12, f"{len(calls)} calm moments in 0.5 s"
    finally:
        engine.stop(1.0)


def test_keep_warm_off_runs_nothing_between_requests(tmp_path: Path) -> None:
    engine = _engine(tmp_path, keep_warm_ms=0)
    seen = _stage_inputs(engine)
    try:
        _request(engine)
        time.sleep(0.3)
        assert len(seen[0]) == 1
    finally:
        engine.stop(1.0)


def test_a_failing_keep_warm_run_is_logged_once_and_requests_are_still_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _engine(tmp_path, keep_warm_ms=10)
    run = engine.runner.run
    calls = []

    def failing_when_blank(k: int, h: torch.Tensor):  # type: ignore[no-untyped-def]
        if not h.any():
            calls.append(k)
            raise RuntimeError("no warm run here")
        return run(k, h)

    engine.runner.run = failing_when_blank  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.ERROR, logger="anytime.engine"):
            _request(engine)
            time.sleep(0.3)
            _request(engine)
        assert calls == [0]
        assert [r.getMessage() for r in caplog.records] == ["keeping stage 1 warm failed; stopped"]
    finally:
        engine.stop(1.0)


def test_the_server_keeps_warm_every_10_ms_in_one_process_unless_told_otherwise() -> None:
    assert engine_config(ServiceSettings()).keep_warm_ms == 10
    assert engine_config(ServiceSettings(keep_warm_ms=0)).keep_warm_ms == 0
    assert engine_config(ServiceSettings(workers=2)).keep_warm_ms == 0  # beside request processes: off
    assert engine_config(ServiceSettings(workers=2, keep_warm_ms=5)).keep_warm_ms == 5
