"""`python -m bench.gpu` runs on a CPU at small sizes (the GPU figures come from the same code on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_the_gpu_benchmark_smokes_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--seconds", "0.3", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    bundled = result["bundled"]
    assert bundled["one_job_p50_ms"]["anytime"] > 0 and bundled["one_job_p50_ms"]["full"] > 0
    for bucket in ("bucket_8", "bucket_32"):
        b = bundled[bucket]
        assert min(b["anytime_images_per_s"]) > 0 and min(b["full_images_per_s"]) > 0
        assert b["ceiling"]["ideal_anytime_over_full"] >= 1 and b["ceiling"]["plain_forward_images_per_s"] > 0
    compute = result["compute_bound"]
    assert {"87/5/8/0", "40/30/20/10"} <= set(compute) and compute["full_images_per_s"] > 0
    assert "| saturation, bucket 32 (img/s) |" in run.stdout and result["machine"]["device"] == "cpu"
