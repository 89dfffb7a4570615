"""The CUDA stage runner on a GPU (marked `cuda`: skipped without one; run them on the GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.artifact import load_artifact, resolve_artifact
from service.engine import Answer, Engine, EngineConfig, Job
from service.engine.runner import CudaGraphRunner, EagerRunner, default_buckets
from service.metrics import Metrics
from service.options import InferenceOptions
from tests.helpers import ROOT

pytestmark = pytest.mark.cuda


def _artifact():  # the newest bundled version
    return load_artifact(resolve_artifact(ROOT / "model_store", "fashion-mnist"))


def test_graph_replay_equals_eager_on_the_same_batches() -> None:
    artifact = _artifact()
    device = torch.device("cuda")
    temps = [e.temperature for e in artifact.manifest.exits]
    eager = EagerRunner(artifact.model, device, temps, "max_softmax")
    graphs = CudaGraphRunner(
        load_artifact(resolve_artifact(ROOT / "model_store", "fashion-mnist")).model,
        device,
        temps,
        "max_softmax",
        default_buckets(256),
    )
    graphs.capture((1, 28, 28))
    for n in (1, 5, 8, 31, 256):
        xs = [torch.randn(1, 28, 28) for _ in range(n)]
        h_e, h_g = eager.load(xs), graphs.load(xs)
        for k in range(eager.num_exits):
            a, b = eager.run(k, h_e), graphs.run(k, h_g)
            assert a.p.shape == b.p.shape == (n, 10)
            assert torch.allclose(a.p, b.p, atol=1e-3), (n, k, (a.p - b.p).abs().max())
            assert np.allclose(a.conf, b.conf, atol=1e-3)
            if a.h is not None:
                h_e, h_g = a.h, b.h


def test_served_decisions_on_cuda_agree_with_cpu_on_the_whole_test_set() -> None:
    """CUDA runs bf16 graphs, the CPU fp32: a row may leave at another exit only where the device that
    stopped earlier was within bf16's error of that exit's threshold, and the labels otherwise agree."""
    from bench.gpu import fashion_tensors

    xs = fashion_tensors(resolve_artifact(ROOT / "model_store", "fashion-mnist"), 10_000)
    answers: dict[str, list[Answer]] = {}
    for device in ("cpu", "cuda"):
        artifact = _artifact()
        engine = Engine(
            artifact, torch.device(device), Metrics().for_model("m", "1", device), EngineConfig(max_batch=256)
        )
        out = []
        for i in range(0, len(xs), 256):
            out += engine.run([Job(x, InferenceOptions.now()) for x in xs[i : i + 256]])
        assert all(isinstance(a, Answer) for a in out)
        answers[device] = out
        thresholds = engine.thresholds
    pairs = list(zip(answers["cpu"], answers["cuda"], strict=True))
    moved = [min((a, b), key=lambda x: x.exit) for a, b in pairs if a.exit != b.exit]
    gaps = [earlier.confidence - thresholds[earlier.exit - 1] for earlier in moved]
    same_exit = [(a, b) for a, b in pairs if a.exit == b.exit]
    labels = sum(a.index == b.index for a, b in same_exit) / len(same_exit)
    print(f"CUDA and CPU: {1 - len(moved) / len(xs):.2%} of the 10,000 test images at the same exit, "
          f"labels there agree on {labels:.2%}; largest margin over the threshold where the exit moved "
          f"{max(gaps, default=0):.4f}")  # fmt: skip
    assert len(moved) <= 0.02 * len(xs)
    assert all(0 <= g < 0.1 for g in gaps)  # bf16 moves a confidence by a few hundredths
    assert labels >= 0.999
