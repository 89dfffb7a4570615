"""Several models and versions from one store, rolled out and back without a restart.

Real servers on 127.0.0.1; new versions are written aside and renamed into the store, as an
operator (or `anytime-export`) does. Load loops are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from models.artifact import ArtifactError, read_manifest, resolve_artifact
from service.config import ServiceSettings
from service.metrics import Metrics
from service.registry import ModelRegistry, freeze_heap
from tests.helpers import ROOT, ServerProcess, make_artifact, metric, png_bytes

GRAY = png_bytes(Image.new("L", (28, 28), 90))
COLOUR = png_bytes(Image.new("RGB", (32, 32), (200, 40, 90)))


def _post(url: str, png: bytes, **params: object) -> httpx.Response:
    return httpx.post(url, content=png, headers={"content-type": "image/png"}, params=params, timeout=30)


def _wait(check, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


def _publish(store: Path, staging: Path, name: str, version: str, **kw: object) -> None:
    """Export a version into `staging`, then rename it into the store: it appears complete or not at all."""
    make_artifact(staging, name, version=version, **kw)
    (store / name).mkdir(parents=True, exist_ok=True)
    os.rename(staging / name / version, store / name / version)


def test_two_models_each_with_its_own_classes_and_exits(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(ROOT / "model_store" / "fashion-mnist", store / "fashion-mnist")
    make_artifact(store, "photos", rgb=True, class_prefix="photo")
    server = ServerProcess(store, "fashion-mnist", model_poll_s=0).wait_ready()
    newest = resolve_artifact(store, "fashion-mnist")  # the newest bundled version
    bundled, exits = newest.name, len(read_manifest(newest).exits)
    try:
        listing = httpx.get(f"{server.url}/v1/models").json()
        assert listing["default"] == "fashion-mnist"
        assert {m["name"]: (m["version"], m["exits"], m["default"]) for m in listing["models"]} == {
            "fashion-mnist": (bundled, exits, True), "photos": ("1", 3, False),
        }  # fmt: skip
        default = _post(f"{server.url}/classify", GRAY).json()
        assert (default["model"], default["exits"]) == ("fashion-mnist", exits)
        assert not default["label"].startswith("photo")
        photo = _post(f"{server.url}/v1/models/photos/classify", COLOUR, top_k=3).json()
        assert (photo["model"], photo["version"], photo["exits"]) == ("photos", "1", 3)
        assert photo["label"].startswith("photo") and len(photo["top_k"]) == 3
        pinned = _post(f"{server.url}/v1/models/photos/versions/1/classify", COLOUR)
        assert pinned.status_code == 200 and pinned.json()["model"] == "photos"
        for url in ("/v1/models/nothing/classify", "/v1/models/photos/versions/9/classify"):
            r = _post(server.url + url, COLOUR)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert httpx.get(f"{server.url}/v1/models/photos/model").json()["input"]["channels"] == 3
        assert httpx.get(f"{server.url}/v1/models/photos").json()["classes"][0] == "photo0"
        assert httpx.get(f"{server.url}/v1/models/nothing/model").status_code == 404
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "anytime_model_info", name="photos", version="1") == 1
        assert metric(text, "anytime_model_info", name="fashion-mnist", version=bundled) == 1
        assert metric(text, "anytime_requests_total", model="photos", version="1", status="200") == 2
        assert metric(text, "anytime_exits_total", model="fashion-mnist") == 1
    finally:
        assert server.stop() == 0


class SteadyLoad:
    """A client thread sending one request after another (at most `limit` s) and recording each answer."""

    def __init__(self, url: str, limit: float = 90.0) -> None:
        self.url, self.limit = url, limit
        self.answers: list[tuple[float, int, str]] = []  # (time, status, version or error code)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self.limit
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < end:
                try:
                    r = client.post(self.url, content=GRAY, headers={"content-type": "image/png"})
                    tag = r.json()["version"] if r.status_code == 200 else r.json()["error"]["code"]
                    self.answers.append((time.monotonic(), r.status_code, tag))
                except httpx.HTTPError as exc:
                    self.answers.append((time.monotonic(), 0, type(exc).__name__))
                time.sleep(0.005)

    def latest(self) -> str | None:
        return self.answers[-1][2] if self.answers else None

    def stop(self) -> list[tuple[float, int, str]]:
        self._stop.set()
        self._thread.join()
        return self.answers


@pytest.fixture()
def rollout(tmp_path: Path, workers: int) -> Iterator[tuple[Path, Path, ServerProcess]]:
    store, staging = tmp_path / "store", tmp_path / "staging"
    make_artifact(store, "tiny", class_prefix="v1-")
    server = ServerProcess(store, "tiny", model_poll_s=0.3, log_level="info", workers=workers).wait_ready()
    yield store, staging, server
    assert server.stop() == 0


@pytest.mark.slow
def test_a_new_version_rolls_out_under_load_and_back(rollout: tuple[Path, Path, ServerProcess]) -> None:
    store, staging, server = rollout
    load = SteadyLoad(f"{server.url}/classify")
    try:
        _wait(lambda: len(load.answers) >= 20, 30)
        _publish(store, staging, "tiny", "2", class_prefix="v2-", seed=1)
        published = time.monotonic()
        swap_s = _wait(lambda: load.latest() == "2", 30)
        # A corrupt version 3 is refused; version 2 keeps serving.
        shutil.copytree(store / "tiny" / "2", staging / "tiny-3")
        weights = staging / "tiny-3" / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
        os.rename(staging / "tiny-3", store / "tiny" / "3")
        failures = lambda: metric(httpx.get(f"{server.url}/metrics").text, "anytime_model_load_failures_total")  # noqa: E731
        _wait(lambda: failures() == 1, 30)
        time.sleep(1.0)  # a few more polls: the failed version is not retried while unchanged
        assert failures() == 1 and load.latest() == "2"
        # Removing versions 3 and 2 rolls back to version 1.
        shutil.rmtree(store / "tiny" / "3")
        shutil.rmtree(store / "tiny" / "2")
        _wait(lambda: load.latest() == "1", 30)
        time.sleep(0.5)
    finally:
        answers = load.stop()
    statuses = {status for _, status, _ in answers}
    versions = [tag for _, _, tag in answers]
    print(f"{len(answers)} requests during the roll-out, swap visible {swap_s:.2f} s after the rename")
    assert statuses == {200}, [a for a in answers if a[1] != 200][:5]  # no request failed
    first_v2 = versions.index("2")
    assert set(versions[:first_v2]) == {"1"} and versions[-1] == "1"
    assert all(t >= published for t, _, tag in answers if tag == "2")
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "anytime_model_info", name="tiny", version="1") == 1
    # Released versions drop out (with several request processes the series stays, at 0, in their files).
    assert metric(text, "anytime_model_info", name="tiny", version="2") in (None, 0)
    assert "does not match its manifest" in server.output()


def test_a_pinned_version_stays_and_the_memory_budget_refuses_a_model(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_artifact(store, "tiny", class_prefix="v1-")
    make_artifact(store, "tiny", class_prefix="v2-", version="2")
    make_artifact(store, "big", "resnet_fmnist_narrow")
    server = ServerProcess(
        store, "tiny", models="tiny:1,big", max_models_bytes=2_000_000, model_poll_s=0.2, log_level="info"
    ).wait_ready()
    try:
        time.sleep(0.6)  # polls see version 2: the pin holds
        answer = _post(f"{server.url}/classify", GRAY).json()
        assert (answer["version"], answer["label"][:3]) == ("1", "v1-")
        assert [m["name"] for m in httpx.get(f"{server.url}/v1/models").json()["models"]] == ["tiny"]
        assert _post(f"{server.url}/v1/models/big/classify", GRAY).status_code == 404
        assert metric(httpx.get(f"{server.url}/metrics").text, "anytime_model_load_failures_total", model="big") == 1
    finally:
        assert server.stop() == 0
    assert "ANYTIME_MAX_MODELS_BYTES" in server.output()


def test_a_version_directory_holding_another_versions_artifact_is_refused(tmp_path: Path) -> None:
    """Version 1 copied to directory 3 would answer as version 1 from directory 3: it is refused like a
    corrupt version (logged and counted) and version 1 keeps serving."""
    store, staging = tmp_path / "store", tmp_path / "staging"
    make_artifact(store, "tiny")
    server = ServerProcess(store, "tiny", model_poll_s=0.2, log_level="info").wait_ready()
    try:
        shutil.copytree(store / "tiny" / "1", staging / "tiny-3")
        os.rename(staging / "tiny-3", store / "tiny" / "3")
        failures = lambda: metric(httpx.get(f"{server.url}/metrics").text, "anytime_model_load_failures_total")  # noqa: E731
        _wait(lambda: failures() == 1, 30)
        assert _post(f"{server.url}/classify", GRAY).json()["version"] == "1"
        assert httpx.get(f"{server.url}/v1/models").json()["models"][0]["version"] == "1"
    finally:
        assert server.stop() == 0
    assert "its manifest says tiny/1; a version directory must hold its own artifact" in server.output()


def test_a_retired_version_is_freed_although_the_heap_was_frozen_once_warm(tmp_path: Path) -> None:
    """A serving process freezes its heap once warm (service/registry.py `freeze_heap`); the engine of a
    version loaded before that holds reference cycles, so retiring it must collect it explicitly."""
    make_artifact(tmp_path, "m", version="1")
    settings = ServiceSettings(model_store=tmp_path, model_name="m", grpc_port=0, model_poll_s=0, drain_timeout_s=1)
    registry = ModelRegistry(settings, Metrics(), torch.device("cpu"))
    registry.start_sync()
    old_engine = weakref.ref(registry.get().engine)
    freeze_heap()

    async def roll_out() -> str:
        make_artifact(tmp_path, "m", version="2")
        await registry.refresh()
        for _ in range(100):  # bounded: 10 s
            if not registry._retiring:
                break
            await asyncio.sleep(0.1)
        return registry.get().version

    try:
        assert asyncio.run(roll_out()) == "2"
        assert old_engine() is None, "the retired version's engine is still alive"
    finally:
        asyncio.run(registry.stop())
        gc.unfreeze()


def test_the_default_model_follows_the_store(tmp_path: Path) -> None:
    """No ANYTIME_MODEL_NAME: the store's one model is the default; several, or none, is a clear error."""

    def registry(**settings: object) -> ModelRegistry:
        fields = {"model_store": tmp_path, "model_name": None, "model_poll_s": 0, "warmup": False, **settings}
        return ModelRegistry(ServiceSettings(**fields), Metrics(), torch.device("cpu"))

    with pytest.raises(ArtifactError, match="holds no model"):
        registry().start_sync()
    make_artifact(tmp_path, "photos")
    only = registry()
    only.start_sync()
    try:
        assert only.default == "photos" and only.get().name == "photos"
    finally:
        asyncio.run(only.stop())
    make_artifact(tmp_path, "sketches")
    with pytest.raises(ArtifactError, match=r"holds 2 models \(photos, sketches\): set ANYTIME_MODEL_NAME"):
        registry().start_sync()
    named = registry(models="sketches")  # the one model ANYTIME_MODELS names
    named.start_sync()
    try:
        assert named.default == "sketches" and [m.name for m in named.served()] == ["sketches"]
    finally:
        asyncio.run(named.stop())
