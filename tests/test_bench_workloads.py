"""The benchmark's realized-efficiency workloads: a random-weight ResNet-18 with the bundled model's exits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.workloads import bundled_exits_network, mix_paths, random_weight_artifact
from models.artifact import load_artifact, read_manifest, resolve_artifact
from tools.processes import ROOT


def test_the_bundled_exits_workload_has_the_bundled_models_exit_points_and_mix(tmp_path: Path) -> None:
    bundled = read_manifest(resolve_artifact(ROOT / "model_store", "fashion-mnist"))
    net = bundled_exits_network(resolve_artifact(ROOT / "model_store", "fashion-mnist"))
    assert net.kwargs["exits"] == bundled.architecture.kwargs["exits"]
    ((name, mix),) = net.mixes.items()
    assert name == f"bundled-v{bundled.version}-mix" and len(mix) == len(bundled.exits)
    assert sum(mix) == pytest.approx(1.0, abs=1e-3)
    artifact = load_artifact(random_weight_artifact(tmp_path, net))
    fractions = [e.flops_fraction for e in artifact.manifest.exits]
    assert len(fractions) == len(bundled.exits) and fractions == sorted(fractions) and fractions[-1] == 1.0
    x = torch.zeros(2, 3, net.size, net.size)
    with torch.inference_mode():
        for k in range(len(fractions)):  # the stage API: run stage k, then exit k
            x = artifact.model.run_stage(k, x)
            assert artifact.model.run_exit(k, x)[0].shape == (2, net.num_classes)
    assert {p.split("=")[1] for p in mix_paths(mix)} <= {str(e) for e in range(1, len(mix) + 1)}
