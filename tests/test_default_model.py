"""The bundled default model, re-evaluated on the real Fashion-MNIST test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.artifact import load_artifact, resolve_artifact
from models.confidence import confidence
from training.data import load_data
from training.evaluate import accuracies, collect_logits
from training.thresholds import evaluate_policy

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_matches_its_manifest_on_the_test_set() -> None:
    artifact = load_artifact(resolve_artifact(ROOT / "model_store", "fashion-mnist"))
    m = artifact.manifest
    bundle = load_data("fashion-mnist", allow_download=False)
    logits, y = collect_logits(artifact.model, DataLoader(bundle.test, batch_size=1000), torch.device("cpu"))
    acc = accuracies(logits, y)
    for e in m.exits:
        assert abs(acc[f"exit{e.exit}"] - e.test_accuracy) <= 0.05, (e.exit, acc, e.test_accuracy)
    conf = torch.stack([confidence(z, e.temperature) for z, e in zip(logits, m.exits, strict=True)]).numpy()
    correct = torch.stack([z.argmax(1) == y for z in logits]).numpy()
    flops = np.array([e.served_flops_fraction or e.flops_fraction for e in m.exits])  # served cost when known
    policy = evaluate_policy(conf, correct, flops, np.array([e.threshold for e in m.exits[:-1]]))
    final = m.exits[-1].test_accuracy
    epsilon = m.policy.epsilon_pp
    assert policy.accuracy * 100 >= final - epsilon, f"policy {policy.accuracy * 100:.2f} % vs final {final:.2f} %"
    assert policy.mean_flops <= 0.6, f"policy uses {policy.mean_flops:.1%} of the full network's FLOPs"
    assert abs(policy.accuracy * 100 - m.policy.test.accuracy) <= 0.05
