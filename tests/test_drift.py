"""The drift guard: its rule on synthetic outcome streams, and shadow checks and adaptation in real servers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.engine.drift import CEILING, MIN_SAMPLES, DriftGuard, wilson
from tests.helpers import ServerProcess, make_artifact, metric, png_bytes
from training.data import load_data


def _feed(guard: DriftGuard, exit_index: int, agreement: float, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for agreed in rng.random(n) < agreement:
        guard.record(exit_index, bool(agreed))


def test_wilson_bounds_contain_the_rate_and_narrow_with_n() -> None:
    low, high = wilson(10, 100)
    assert low < 0.1 < high
    low2, high2 = wilson(100, 1000)
    assert low < low2 < 0.1 < high2 < high
    assert wilson(0, 0) == (0.0, 1.0)


def test_clean_traffic_moves_nothing() -> None:
    changes: list[np.ndarray] = []
    guard = DriftGuard([0.7, 0.8, 0.0], [0.97, 0.98, None], epsilon=0.005, adapt=True, on_change=changes.append)
    _feed(guard, 0, 0.97, 5000)
    _feed(guard, 1, 0.98, 5000, seed=1)
    assert changes == [] and guard.thresholds.tolist() == [0.7, 0.8, 0.0]
    assert guard.agreement()[0] == pytest.approx(0.97, abs=0.01)


def test_drift_raises_a_threshold_step_by_step_and_recovery_lowers_it_back() -> None:
    changes: list[np.ndarray] = []
    guard = DriftGuard([0.7, 0.8, 0.0], [0.97, 0.98, None], epsilon=0.005, adapt=True, on_change=changes.append)
    _feed(guard, 0, 0.70, MIN_SAMPLES)  # drift: 30 % disagreement against 3.5 % allowed
    assert guard.thresholds[0] == pytest.approx(0.85)  # one step: half the distance to 1
    _feed(guard, 0, 0.70, 3 * MIN_SAMPLES, seed=2)
    assert guard.thresholds[0] == pytest.approx(1 - 0.3 / 16)
    assert guard.thresholds[1] == 0.8 and len(changes) == 4  # other exits untouched
    _feed(guard, 0, 0.995, 20 * MIN_SAMPLES, seed=3)  # recovered: comes back down, never below 0.7
    assert guard.thresholds[0] == pytest.approx(0.7) and changes[-1][0] == pytest.approx(0.7)


def test_the_ceiling_without_expectation_and_without_adapt() -> None:
    guard = DriftGuard([0.7, 0.0], [0.97, None], epsilon=0.0, adapt=True)
    _feed(guard, 0, 0.0, 60 * MIN_SAMPLES)
    assert guard.thresholds[0] == CEILING  # some samples still leave: recovery stays observable
    blind = DriftGuard([0.7, 0.0], [None, None], epsilon=0.0, adapt=True)
    _feed(blind, 0, 0.0, 10 * MIN_SAMPLES)
    passive = DriftGuard([0.7, 0.0], [0.97, None], epsilon=0.0, adapt=False)
    _feed(passive, 0, 0.0, 10 * MIN_SAMPLES)
    assert blind.thresholds[0] == passive.thresholds[0] == 0.7


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    test = load_data("fashion-mnist", allow_download=False).test
    return [png_bytes(Image.fromarray(test.images[i][0].numpy())) for i in range(300)]


def _post(url: str, png: bytes, **params: object) -> dict:
    r = httpx.post(f"{url}/classify", content=png, headers={"content-type": "image/png"}, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_shadow_checks_are_counted_against_the_expectation(tmp_path: Path, pngs: list[bytes], workers: int) -> None:
    """Every early answer is shadow-checked, but never the warm-up's requests (they run before ready)."""
    make_artifact(tmp_path, "tiny", thresholds=[0.0, 0.0, 0.0])  # exit 1 answers every request
    server = ServerProcess(tmp_path, "tiny", shadow_rate=1, workers=workers).wait_ready()
    try:
        time.sleep(1.0)  # an idle worker would run any check the warm-up queued
        warm = metric(httpx.get(f"{server.url}/metrics").text, "anytime_shadow_samples_total", model="tiny", exit="1")
        assert not warm, f"{warm} warm-up requests were shadow-checked"
        for png in pngs[:40]:
            _post(server.url, png)
        _post(server.url, pngs[0], threshold=0)  # the client's own threshold: not the artifact's policy
        time.sleep(1.0)  # the idle worker runs the checks
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "anytime_shadow_samples_total", model="tiny", exit="1") == 40
        agreements = metric(text, "anytime_shadow_agreements_total", model="tiny", exit="1")
        assert agreements is not None and 0 <= agreements <= 40
        assert metric(text, "anytime_exit_expected_agreement", model="tiny", exit="1") == 0.9
        assert metric(text, "anytime_threshold", model="tiny", exit="1") == 0.0
        view = httpx.get(f"{server.url}/v1/model").json()
        assert view["thresholds_in_force"] == [0.0, 0.0, 0.0] and view["shadow_agreement"][0] == agreements / 40
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_adaptation_raises_the_threshold_of_a_disagreeing_exit(tmp_path: Path, pngs: list[bytes]) -> None:
    """An untrained network's exit 1 agrees with its final exit far less often than the 90 % its
    manifest claims: with ANYTIME_ADAPT the guard raises that exit's threshold; a client's own wins."""
    make_artifact(tmp_path, "tiny", thresholds=[0.0, 0.0, 0.0])
    server = ServerProcess(tmp_path, "tiny", shadow_rate=1, adapt="true", log_level="info").wait_ready()
    try:
        for png in pngs[: MIN_SAMPLES + 50]:
            _post(server.url, png)
            time.sleep(0.004)  # room for the idle worker's checks
        time.sleep(1.0)
        view = httpx.get(f"{server.url}/v1/model").json()
        text = httpx.get(f"{server.url}/metrics").text
        samples = metric(text, "anytime_shadow_samples_total", model="tiny", exit="1") or 0
        agreements = metric(text, "anytime_shadow_agreements_total", model="tiny", exit="1") or 0
        assert samples >= MIN_SAMPLES and agreements / samples < 0.85, (samples, agreements)  # the premise
        assert view["thresholds_in_force"][0] >= 0.5 and view["thresholds_in_force"][1:] == [0.0, 0.0]
        assert metric(text, "anytime_threshold", model="tiny", exit="1") == view["thresholds_in_force"][0]
        assert _post(server.url, pngs[0], threshold=0)["exit"] == 1  # a client's threshold still wins
    finally:
        assert server.stop() == 0
    assert "thresholds in force" in server.output()


@pytest.mark.slow
def test_under_saturation_shadow_work_waits_and_overflow_is_dropped(tmp_path: Path, pngs: list[bytes]) -> None:
    make_artifact(tmp_path, "sleepy", "test_sleepy", [0.0, 1.0, 1.0, 0.0], stage_ms=[10] * 4)
    server = ServerProcess(tmp_path, "sleepy", shadow_rate=1, shadow_queue=16, max_batch=1, warmup="false")
    server.wait_ready()

    async def saturate(seconds: float) -> int:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            end, done = time.monotonic() + seconds, 0

            async def loop() -> None:
                nonlocal done
                while time.monotonic() < end:
                    await client.post("/classify", content=pngs[done % 300], headers={"content-type": "image/png"})
                    done += 1

            await asyncio.gather(*(loop() for _ in range(6)))  # the queue never empties
            return done

    try:
        answered = asyncio.run(saturate(3.0))
        during = httpx.get(f"{server.url}/metrics").text
        time.sleep(2.0)  # idle now: the queued checks run
        after = httpx.get(f"{server.url}/metrics").text
    finally:
        assert server.stop() == 0
    checked_during = metric(during, "anytime_shadow_samples_total", model="sleepy") or 0
    dropped = metric(during, "anytime_shadow_dropped_total", model="sleepy") or 0
    print(f"{answered} answers under saturation: {checked_during} shadow checks ran, {dropped} dropped")
    assert answered > 50 and checked_during <= 2 and dropped >= answered - 16 - 6
    assert metric(after, "anytime_shadow_samples_total", model="sleepy") >= 10
