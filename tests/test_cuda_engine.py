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
    from bench.gpu import fashion_tensors

    xs = fashion_tensors(resolve_artifact(ROOT / "model_store", "fashion-mnist"), 10_000)
    answers = {}
    for device in ("cpu", "cuda"):
        artifact = _artifact()
        engine = Engine(
            artifact, torch.device(device), Metrics().for_model("m", "1", device), EngineConfig(max_batch=256)
        )
        out = []
        for i in range(0, len(xs), 256):
            out += engine.run([Job(x, InferenceOptions.now()) for x in xs[i : i + 256]])
        assert all(isinstance(a, Answer) for a in out)
        answers[device] = [(a.index, a.exit) for a in out]
    same = sum(a == b for a, b in zip(answers["cpu"], answers["cuda"], strict=True)) / len(xs)
    print(f"CUDA and CPU agree on {same:.2%} of the 10,000 test images (label and exit)")
    assert same >= 0.998
