"""The engine in process: exit-aware batching and a failing batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from models.artifact import load_artifact
from models.exit_policy import Reason
from service.engine import Engine, EngineFailure, Job
from service.metrics import Metrics
from tests.helpers import make_artifact


def _engine(tmp_path: Path, max_wait_ms: float = 200.0) -> Engine:
    artifact = load_artifact(make_artifact(tmp_path, "tiny", "test_tiny"))
    engine = Engine(
        artifact, torch.device("cpu"), Metrics().for_model("tiny", "1", "cpu"), max_batch=8, max_wait_ms=max_wait_ms
    )
    engine.start(warmup=False)
    return engine


async def _submit_all(engine: Engine, requests: list[Job]) -> list:
    futures = [engine.submit(r) for r in requests]
    return await asyncio.gather(*futures, return_exceptions=True)


def test_samples_confident_at_exit_1_leave_the_batch(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    rows_per_stage: list[list[int]] = [[] for _ in range(engine.num_exits)]
    for k, stage in enumerate(engine.model.stages):
        stage.register_forward_hook(lambda _m, inp, _o, k=k: rows_per_stage[k].append(inp[0].shape[0]))
    x = torch.randn(1, 28, 28)
    requests = [Job(x, threshold=0.0 if i % 2 else 1.0) for i in range(8)]
    answers = asyncio.run(_submit_all(engine, requests))
    engine.stop(1.0)
    assert rows_per_stage[0] == [8] and rows_per_stage[1] == [4] and rows_per_stage[2] == [4]
    assert [a.exit for a in answers] == [3, 1] * 4
    assert {a.reason for a in answers[1::2]} == {Reason.CONFIDENCE}
    assert {a.reason for a in answers[::2]} == {Reason.FINAL}


def test_a_failing_batch_is_answered_and_the_next_one_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(tmp_path, max_wait_ms=50)
    original = engine.model.run_stage
    calls = {"n": 0}

    def flaky(k: int, h: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("GPU fell off the bus")
        return original(k, h)

    monkeypatch.setattr(engine.model, "run_stage", flaky)
    x = torch.randn(1, 28, 28)

    async def scenario() -> tuple[list, list]:
        first = await _submit_all(engine, [Job(x), Job(x)])
        second = await _submit_all(engine, [Job(x)])
        return first, second

    first, second = asyncio.run(scenario())
    engine.stop(1.0)
    assert all(isinstance(a, EngineFailure) for a in first)
    assert "RuntimeError" in str(first[0]) and "bus" not in str(first[0])  # no internals leak
    assert second[0].exit >= 1
