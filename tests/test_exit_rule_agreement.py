"""One exit rule: what export predicts for a threshold vector is what the server does.

On 200 real Fashion-MNIST test images, export's own functions (logits over a loader, calibrated
confidence, `evaluate_policy`) predict each image's exit and label; the real server, over HTTP,
must answer every image at the same exit with the same label, for the bundled thresholds, for a
per-request threshold of 0 and of 1, and for an artifact whose thresholds are [1, 0.8, 0, 0].
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from models.artifact import ManifestBody, load_artifact, resolve_artifact, save_artifact
from models.confidence import confidence
from models.exit_policy import answering_exits
from models.preprocess import Preprocess
from service.images import decode_image
from tests.helpers import ROOT, ServerProcess, png_bytes
from training.data import load_data
from training.evaluate import collect_logits
from training.thresholds import evaluate_policy

N = 200


@pytest.fixture(scope="module")
def images() -> list[tuple[bytes, int]]:
    test = load_data("fashion-mnist", allow_download=False).test
    return [(png_bytes(Image.fromarray(test.images[i][0].numpy())), int(test.labels[i])) for i in range(N)]


def _predicted(artifact_dir: Path, images: list[tuple[bytes, int]], thresholds: list[float]) -> dict:
    """Export's prediction: per image the 0-based exit and label, plus accuracy and exit shares."""
    artifact = load_artifact(artifact_dir)
    m = artifact.manifest
    tf = Preprocess(m.input)
    x = torch.stack([decode_image(png, m.input, tf, 10**7) for png, _ in images])
    y = torch.tensor([label for _, label in images])
    # Batch 1, as the server sees sequential requests: no batch-size rounding differences.
    logits, targets = collect_logits(artifact.model, DataLoader(TensorDataset(x, y), batch_size=1), torch.device("cpu"))
    conf = torch.stack([confidence(z, e.temperature) for z, e in zip(logits, m.exits, strict=True)]).numpy()
    correct = torch.stack([z.argmax(1) == targets for z in logits]).numpy()
    flops = np.array([e.flops_fraction for e in m.exits])
    policy = evaluate_policy(conf, correct, flops, np.array(thresholds[:-1]))
    exits = answering_exits(conf, thresholds)
    labels = [int(logits[k][i].argmax()) for i, k in enumerate(exits.tolist())]
    return {"exits": exits.tolist(), "labels": labels, "accuracy": policy.accuracy, "rates": policy.exit_rates}


def _served(url: str, images: list[tuple[bytes, int]], num_exits: int, **params: float) -> dict:
    exits, labels = [], []
    with httpx.Client(base_url=url, timeout=30) as client:
        for png, _ in images:
            r = client.post("/classify", content=png, headers={"content-type": "image/png"}, params=params)
            assert r.status_code == 200, r.text
            exits.append(r.json()["exit"] - 1)
            labels.append(r.json()["index"])
    truth = [label for _, label in images]
    rates = np.bincount(exits, minlength=num_exits) / len(exits)
    accuracy = sum(a == b for a, b in zip(labels, truth, strict=True)) / len(truth)
    return {"exits": exits, "labels": labels, "accuracy": accuracy, "rates": rates.tolist()}


def _assert_agree(predicted: dict, served: dict) -> None:
    assert served["exits"] == predicted["exits"]
    assert served["labels"] == predicted["labels"]
    assert served["accuracy"] == pytest.approx(predicted["accuracy"], abs=1e-12)
    assert served["rates"] == pytest.approx(predicted["rates"], abs=1e-12)


@pytest.mark.slow
def test_bundled_thresholds_and_per_request_0_and_1(images: list[tuple[bytes, int]], tmp_path: Path) -> None:
    path = resolve_artifact(ROOT / "model_store", "fashion-mnist")
    own = [e.threshold for e in load_artifact(path).manifest.exits]
    n = len(own)
    server = ServerProcess(ROOT / "model_store", "fashion-mnist", log_dir=tmp_path).wait_ready()
    try:
        for params, thresholds in (({}, own), ({"threshold": 0}, [0.0] * n), ({"threshold": 1}, [1.0] * n)):
            predicted = _predicted(path, images, thresholds)
            _assert_agree(predicted, _served(server.url, images, n, **params))
    finally:
        assert server.stop() == 0
    assert len(set(_predicted(path, images, own)["exits"])) >= 2  # the bundled thresholds really spread exits


@pytest.mark.slow
def test_an_artifact_with_thresholds_1_and_0_mixed(images: list[tuple[bytes, int]], tmp_path: Path) -> None:
    bundled = load_artifact(resolve_artifact(ROOT / "model_store", "fashion-mnist"))
    thresholds = [1.0, 0.8] + [0.0] * (len(bundled.manifest.exits) - 2)
    raw = bundled.manifest.model_dump()
    raw["exits"] = [{**e, "threshold": t} for e, t in zip(raw["exits"], thresholds, strict=True)]
    path = save_artifact(bundled.model, ManifestBody.model_validate(raw), tmp_path, "mixed", "1")
    server = ServerProcess(tmp_path, "mixed").wait_ready()
    try:
        predicted = _predicted(path, images, thresholds)
        _assert_agree(predicted, _served(server.url, images, len(thresholds)))
    finally:
        assert server.stop() == 0
    assert set(predicted["exits"]) <= {1, 2} and 0 not in predicted["exits"]  # 0-based: 1 never, 3 takes the rest
