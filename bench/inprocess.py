"""The in-process path the HTTP overhead is measured against: decode + the engine's exit path.

`python -m bench.inprocess ARTIFACT_DIR IMAGE_DIR --seconds S` decodes each PNG of IMAGE_DIR
(round robin) and serves it with `Engine.run`, the very code the server's worker runs, one image
at a time in this thread, for S seconds; it prints the median and mean milliseconds as JSON
(`--gap-ms G`: idle G ms before each image, as a server's core is between requests).
With `--evaluate LABELS.json` it instead runs every image once and prints the accuracy, the
exit distribution and the mean FLOPs fraction of the exits taken. `make bench` runs it pinned
to the server's core, between HTTP runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from models.artifact import load_artifact
from models.preprocess import Preprocess
from service.engine import Answer, Engine, EngineConfig, Job
from service.images import decode_image
from service.metrics import Metrics
from service.options import InferenceOptions


def _engine(artifact_dir: Path) -> tuple[Engine, Preprocess]:
    artifact = load_artifact(artifact_dir)
    metrics = Metrics().for_model(artifact.manifest.name, artifact.manifest.version, "cpu")
    return Engine(artifact, torch.device("cpu"), metrics, EngineConfig(max_batch=1)), Preprocess(
        artifact.manifest.input
    )


def latency(
    artifact_dir: Path, images: list[bytes], seconds: float, threshold: float | None, gap_s: float = 0.0
) -> dict[str, float]:
    """Median and mean ms of decode + exit path per image, after a one-second warm-up; with `gap_s`, the
    thread sleeps that long before each image (a core that goes idle between requests, as a server's does)."""
    engine, preprocess = _engine(artifact_dir)
    spec = engine.input
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds + 1.0:
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        x = decode_image(images[i % len(images)], spec, preprocess, 10**8)
        engine.run([Job(x, InferenceOptions.now(threshold=threshold))])
        if t0 - start >= 1.0:
            times.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return {"p50_ms": statistics.median(times), "mean_ms": statistics.mean(times), "n": len(times)}


def evaluate(artifact_dir: Path, images: list[bytes], labels: list[int], threshold: float | None) -> dict:
    """Accuracy, exit shares and mean FLOPs fraction of serving every image once."""
    engine, preprocess = _engine(artifact_dir)
    flops = [e.flops_fraction or 0.0 for e in load_artifact(artifact_dir).manifest.exits]
    answers: list[Answer] = []
    for png in images:
        x = decode_image(png, engine.input, preprocess, 10**8)
        out = engine.run([Job(x, InferenceOptions.now(threshold=threshold))])[0]
        assert isinstance(out, Answer), out
        answers.append(out)
    exits = [a.exit for a in answers]
    return {
        "accuracy": sum(a.index == y for a, y in zip(answers, labels, strict=True)) / len(answers),
        "exit_shares": {str(k): exits.count(k) / len(exits) for k in sorted(set(exits))},
        "mean_flops_fraction": statistics.mean(flops[e - 1] for e in exits),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("images", type=Path, help="directory of PNG files")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--gap-ms", type=float, default=0.0, help="sleep this long before each image")
    parser.add_argument("--evaluate", type=Path, help="JSON list of labels, in the images' sorted order")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    images = [p.read_bytes() for p in sorted(args.images.glob("*.png"))]
    if args.evaluate:
        result = evaluate(args.artifact, images, json.loads(args.evaluate.read_text()), args.threshold)
    else:
        result = latency(args.artifact, images, args.seconds, args.threshold, args.gap_ms / 1e3)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
