"""`python -m bench.drift`: the drift guard on a real shift (docs/monitoring.md, "Drift guard"; results/drift.md).

The bundled model serves Fashion-MNIST test images over HTTP: first clean, then shifted by one
corruption (Gaussian noise, blur, low contrast, inversion) at several severities. For each stream:

- offline, in this process with the engine's own code: accuracy at full depth and at the artifact's
  thresholds, the share of early exits, and each exit's true agreement with the final exit;
- online, a server with shadow checks and a real Prometheus loading docker/prometheus/anytime.rules.yml
  (its windows shortened from 30 minutes to 1 minute and its minimum from 50 checks to 20, since a
  stream here lasts seconds): the agreement the metrics show, and how many requests of the shifted
  stream were answered before the alert's condition held (the alert turned pending);
- with ANYTIME_ADAPT on, a fresh server per stream: served accuracy in its first and last quarter,
  against full depth, and the thresholds it ended with.

Everything runs on 127.0.0.1, every stream is bounded; results go to bench/results/drift.json and
results/drift.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageFilter

from tools.processes import ROOT, LocalProcess, ServerProcess, free_port

OUT = ROOT / "bench" / "results"
RULES = ROOT / "docker" / "prometheus" / "anytime.rules.yml"

Corruption = Callable[[np.ndarray], np.ndarray]


def _noise(sigma: float) -> Corruption:
    rng = np.random.default_rng(0)
    return lambda a: np.clip(a + rng.normal(0, sigma * 255, a.shape), 0, 255)


def _blur(radius: float) -> Corruption:
    return lambda a: np.asarray(Image.fromarray(a.astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)))


def _contrast(factor: float) -> Corruption:
    return lambda a: (a - a.mean()) * factor + a.mean()


STREAMS: dict[str, Corruption | None] = {
    "clean": None,
    "noise 0.1": _noise(0.1),
    "noise 0.2": _noise(0.2),
    "noise 0.3": _noise(0.3),
    "blur 1.0": _blur(1.0),
    "blur 1.5": _blur(1.5),
    "blur 2.0": _blur(2.0),
    "contrast 0.5": _contrast(0.5),
    "contrast 0.3": _contrast(0.3),
    "contrast 0.15": _contrast(0.15),
    "inverted": lambda a: 255 - a,
}


def pngs(images: np.ndarray, corruption: Corruption | None) -> list[bytes]:
    out = []
    for img in images:
        arr = img.astype(np.float64) if corruption is None else corruption(img.astype(np.float64))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def offline(artifact: Path, stream: list[bytes], labels: np.ndarray) -> dict[str, Any]:
    """Ground truth with the engine's own code: accuracy at full depth and at the artifact's thresholds,
    early share, and per exit the true agreement of the samples it answers."""
    import torch

    from models.artifact import load_artifact
    from models.preprocess import Preprocess
    from service.engine import Engine, EngineConfig, Job
    from service.images import decode_image
    from service.metrics import Metrics
    from service.options import InferenceOptions

    loaded = load_artifact(artifact)
    engine = Engine(loaded, torch.device("cpu"), Metrics().for_model("x", "1", "cpu"), EngineConfig(max_batch=64))
    pre = Preprocess(loaded.manifest.input)
    xs = [decode_image(p, loaded.manifest.input, pre, 10**7) for p in stream]
    served = [
        a for i in range(0, len(xs), 64) for a in engine.run([Job(x, InferenceOptions.now()) for x in xs[i : i + 64]])
    ]
    final = [
        a
        for i in range(0, len(xs), 64)
        for a in engine.run([Job(x, InferenceOptions.now(threshold=1.0)) for x in xs[i : i + 64]])
    ]
    exits = np.array([a.exit for a in served])
    agree = np.array([a.index == f.index for a, f in zip(served, final, strict=True)])
    return {
        "accuracy_full": float(np.mean([f.index == y for f, y in zip(final, labels, strict=True)])),
        "accuracy_served": float(np.mean([a.index == y for a, y in zip(served, labels, strict=True)])),
        "early_share": float((exits < loaded.manifest.num_exits).mean()),
        "agreement_by_exit": {
            str(k): float(agree[exits == k].mean()) for k in range(1, loaded.manifest.num_exits) if (exits == k).any()
        },
    }


def _stream(url: str, bodies: list[bytes], concurrency: int = 8) -> list[dict]:
    async def run() -> list[dict]:
        answers: list[dict] = [{}] * len(bodies)
        queue = iter(range(len(bodies)))
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def worker() -> None:
                for i in queue:
                    r = await client.post("/classify", content=bodies[i], headers={"content-type": "image/png"})
                    answers[i] = r.json() if r.status_code == 200 else {"status": r.status_code}

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return answers

    return asyncio.run(run())


def _prometheus(work: Path, target: str) -> LocalProcess:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("bench.drift needs Debian's prometheus")
    rules = RULES.read_text().replace("[30m]", "[1m]").replace(">= 50", ">= 20").replace("for: 5m", "for: 1m")
    (work / "rules.yml").write_text(rules)
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [rules.yml]\n"
        f"scrape_configs:\n  - job_name: anytime\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    argv = [
        binary,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return LocalProcess(argv, port, work / "prometheus.log").wait_ready("/-/ready")


def _pending(prometheus: LocalProcess) -> bool:
    query = 'ALERTS{alertname="AnytimeExitDisagreement"}'
    r = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": query}, timeout=10).json()
    return bool(r["data"]["result"])


def detection(store: Path, name: str, clean: list[bytes], shifted: list[bytes], work: Path) -> dict[str, Any]:
    """Requests of the shifted stream answered before the alert condition held (with a clean lead-in)."""
    server = ServerProcess(store, name, log_dir=work, shadow_rate=0.25, shadow_queue=256).wait_ready()
    prometheus = _prometheus(work, f"127.0.0.1:{server.port}")
    try:
        _stream(server.url, clean)
        time.sleep(3)
        clean_alert = _pending(prometheus)
        sent = 0
        for start in range(0, len(shifted), 100):
            _stream(server.url, shifted[start : start + 100])
            sent = start + 100
            time.sleep(1.2)  # a scrape and an evaluation
            if _pending(prometheus):
                break
        else:
            sent = -1
        text = httpx.get(f"{server.url}/metrics").text
    finally:
        prometheus.stop()
        server.stop()
    samples = _counter(text, "anytime_shadow_samples_total")
    agreements = _counter(text, "anytime_shadow_agreements_total")
    return {
        "alert_on_clean": clean_alert,
        "requests_until_alert": sent,
        "measured_agreement_by_exit": {e: agreements.get(e, 0) / n for e, n in sorted(samples.items()) if n},
    }


def _counter(text: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["exit"]] = out.get(s.labels["exit"], 0) + s.value
    return out


def adaptation(store: Path, name: str, stream: list[bytes], labels: np.ndarray, work: Path) -> dict[str, Any]:
    """With ANYTIME_ADAPT on: a first pass over the stream lets the guard learn, a second pass over the
    same images is scored (served accuracy and early share), with the thresholds in force then."""
    server = ServerProcess(store, name, log_dir=work, shadow_rate=0.25, shadow_queue=256, adapt="true").wait_ready()
    try:
        passes = []
        for _ in range(2):
            answers = []
            for start in range(0, len(stream), 200):
                answers += _stream(server.url, stream[start : start + 200])
                time.sleep(0.3)  # the idle worker runs the queued checks
            passes.append(answers)
        thresholds = httpx.get(f"{server.url}/v1/model").json()["thresholds_in_force"]
    finally:
        server.stop()
    first, second = passes
    correct = [np.mean([a.get("index") == y for a, y in zip(p, labels, strict=True)]) for p in passes]
    return {
        "accuracy_first_pass": float(correct[0]),
        "accuracy_second_pass": float(correct[1]),
        "early_share_second_pass": float(np.mean([a.get("exit", 0) < a.get("exits", 0) for a in second])),
        "thresholds_at_end": thresholds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift", description=__doc__)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--name", default="fashion-mnist")
    parser.add_argument("--images", type=int, default=2000, help="test images per stream")
    parser.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    parser.add_argument("--report", type=Path, default=ROOT / "results" / "drift.md")
    args = parser.parse_args(argv)
    from models.artifact import resolve_artifact
    from training.data import load_data

    artifact = resolve_artifact(args.store, args.name)
    test = load_data("fashion-mnist", allow_download=False).test
    images = test.images[: args.images, 0].numpy()
    labels = test.labels[: args.images].numpy()
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"images": args.images}
    clean = pngs(images, None)
    with tempfile.TemporaryDirectory(prefix="anytime-drift-") as tmp:
        for name in args.streams:
            stream = pngs(images, STREAMS[name])
            row = {"offline": offline(artifact, stream, labels)}
            work = Path(tmp) / name.replace(" ", "-")
            work.mkdir()
            row["detection"] = detection(args.store, args.name, clean[: args.images // 2], stream, work)
            row["adaptation"] = adaptation(args.store, args.name, stream, labels, work)
            results[name] = row
            sys.stdout.write(f"{name}: {json.dumps(row)}\n")
    (OUT / "drift.json").write_text(json.dumps(results, indent=2))
    args.report.write_text(report(results, artifact))
    sys.stdout.write(args.report.read_text())
    return 0


def report(results: dict[str, Any], artifact: Path) -> str:
    from models.artifact import read_manifest

    m = read_manifest(artifact)
    expected = ", ".join(f"exit {e.exit}: {e.expected_agreement:.3f}" for e in m.exits if e.expected_agreement)
    lines = [
        f"# Drift guard on shifted Fashion-MNIST ({m.name} v{m.version})",
        "",
        f"Expected agreement with the final exit (validation, manifest): {expected or 'none'}; "
        f"ε = {m.policy.epsilon_pp} pp. Each stream: the first {results['images']} test images as PNGs over HTTP "
        "(`python -m bench.drift`). Agreements are listed exit by exit (the shallow exits that answered).",
        "",
        "| stream | full depth | served (artifact thresholds) | gap (pp) | early share | true agreement by exit "
        "| measured (shadow) | requests until alert | adapting: pass 1 → pass 2 | gap after (pp) "
        "| thresholds after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results.items():
        if name == "images":
            continue
        o, d, a = row["offline"], row["detection"], row["adaptation"]
        true = " / ".join(f"{v:.3f}" for v in o["agreement_by_exit"].values())
        measured = " / ".join(f"{v:.3f}" for v in d["measured_agreement_by_exit"].values())
        until = "no alert" if d["requests_until_alert"] < 0 else str(d["requests_until_alert"])
        lines.append(
            f"| {name} | {o['accuracy_full']:.2%} | {o['accuracy_served']:.2%} | "
            f"{100 * (o['accuracy_full'] - o['accuracy_served']):.2f} | {o['early_share']:.1%} | {true} | {measured} | "
            f"{until}{' (alert on clean!)' if d['alert_on_clean'] else ''} | {a['accuracy_first_pass']:.2%} → "
            f"{a['accuracy_second_pass']:.2%} ({a['early_share_second_pass']:.0%} early) | "
            f"{100 * (o['accuracy_full'] - a['accuracy_second_pass']):.2f} | "
            f"{', '.join(f'{t:.3f}' for t in a['thresholds_at_end'][:-1])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
