"""`make bench`: Anytime vs full depth, HTTP overhead, deadlines, and a peer server, side by side.

Everything runs on this machine against 127.0.0.1: the servers are started here and stopped by
PID, every load run is bounded in time and count. Results: `bench/results/*.json`, PNG plots,
`bench/results/summary.json`, and a table on stdout. Speed-ups are ratios of runs made in
this one invocation, one after the other, with the same images and client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.loadgen import LoadRun, fashion_mnist_pngs, plot_run
from client.stats import by_deadline, format_summary, summarize
from models.artifact import resolve_artifact
from tools.processes import ROOT, LocalProcess, ServerProcess, free_port

OUT = ROOT / "bench" / "results"


def _load(
    url: str, images: list, name: str, seconds: float, *, rate: float | None = None, concurrency: int = 16,
    params: dict | None = None, deadlines: list[float] | None = None, path: str = "/classify",
) -> dict[str, Any]:  # fmt: skip
    run = LoadRun(url, images, seconds, 200_000, deadlines, params, progress=False, path=path)
    duration = asyncio.run(run.open_loop(rate) if rate else run.closed_loop(concurrency))
    summary = summarize(run.records, duration)
    from dataclasses import asdict

    (OUT / f"{name}.json").write_text(json.dumps({"name": name, "summary": summary,
                                                  "records": [asdict(r) for r in run.records]}))  # fmt: skip
    plot_run(name, run.records, OUT)
    sys.stdout.write(format_summary(name, summary) + "\n\n")
    summary["records_by_deadline"] = by_deadline(run.records) if deadlines else None
    return summary


def in_process_latency(images: list, store: Path, name: str) -> float:
    """Median ms of decode + the engine's stage-wise exit path, in this process, one image at a time."""
    import torch

    from models.artifact import load_artifact
    from service.engine import Engine, Job
    from service.images import build_transform, decode_image
    from service.metrics import Metrics

    torch.set_num_threads(1)
    artifact = load_artifact(resolve_artifact(store, name))
    engine = Engine(artifact, torch.device("cpu"), Metrics(), max_batch=1)
    spec = artifact.manifest.input
    tf = build_transform(spec)
    times = []
    for png, _ in images[:500]:
        t0 = time.perf_counter()
        engine.run([Job(decode_image(png, spec, tf, 16_000_000))])
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _serve_anytime(store: Path, name: str) -> ServerProcess:
    return ServerProcess(store, name, log_dir=OUT).wait_ready()  # type: ignore[return-value]


def anytime_benchmarks(images: list, store: Path, name: str, seconds: float) -> dict[str, Any]:
    """1. anytime vs full depth, 2. HTTP overhead, 3. deadlines — all against one server."""
    server = _serve_anytime(store, name)
    try:
        sat_any = _load(server.url, images, "saturation-anytime", seconds, concurrency=16)
        sat_full = _load(server.url, images, "saturation-full", seconds, concurrency=16, params={"threshold": 1})
        rate = 0.5 * sat_full["throughput_rps"]
        fixed_any = _load(server.url, images, "fixed-rate-anytime", seconds, rate=rate)
        fixed_full = _load(server.url, images, "fixed-rate-full", seconds, rate=rate, params={"threshold": 1})
        single = _load(server.url, images, "single-client-anytime", seconds, concurrency=1)
        deadline_rate = 0.8 * sat_any["throughput_rps"]
        deadlines = _load(server.url, images, "deadlines", seconds * 2, rate=deadline_rate,
                          deadlines=[1, 2, 5, 10, 20])  # fmt: skip
    finally:
        server.stop()
    in_process = in_process_latency(images, store, name)
    return {
        "anytime_vs_full": {
            "saturation_rps": {"anytime": sat_any["throughput_rps"], "full": sat_full["throughput_rps"]},
            "throughput_ratio": sat_any["throughput_rps"] / sat_full["throughput_rps"],
            "accuracy": {"anytime": sat_any["accuracy"], "full": sat_full["accuracy"]},
            "accuracy_loss_pp": 100 * (sat_full["accuracy"] - sat_any["accuracy"]),
            "fixed_rate_rps": rate,
            "fixed_rate_latency_ms": {
                "anytime": {k: fixed_any["latency_ms"][k] for k in ("mean", "p50", "p99")},
                "full": {k: fixed_full["latency_ms"][k] for k in ("mean", "p50", "p99")},
            },
        },
        "overhead": {
            "http_p50_ms": single["latency_ms"]["p50"],
            "in_process_p50_ms": in_process,
            "ratio": single["latency_ms"]["p50"] / in_process,
        },
        "deadlines": {"rate_rps": deadline_rate, "by_deadline_ms": deadlines["records_by_deadline"]},
    }


def peer_benchmarks(images: list, store: Path, name: str, seconds: float, rate: float) -> dict[str, Any]:
    """4. peers serving the same model at full depth, same images and load: a plain FastAPI
    endpoint and TorchServe (every listener on 127.0.0.1, token auth off for the benchmark only)."""
    results: dict[str, Any] = {}
    port = free_port()
    argv = [sys.executable, "-m", "bench.peers.baseline", "--store", str(store), "--name", name, "--port", str(port)]

    def baseline() -> LocalProcess:
        return LocalProcess(argv, port, OUT / f"server-{port}.log", {"PYTHONPATH": str(ROOT)}).wait_ready("/docs")

    peers = [("baseline_fastapi", baseline, "/classify")]
    ports = [free_port() for _ in range(5)]

    def torchserve() -> LocalProcess:
        from bench.peers.torchserve.launch import prepare

        work = Path(tempfile.mkdtemp(prefix="torchserve-"))
        command = prepare(resolve_artifact(store, name), work, ports)
        env = {"PYTHONPATH": str(ROOT), "LOG_LOCATION": str(work), "METRICS_LOCATION": str(work)}
        return LocalProcess(command, ports[0], OUT / f"server-{ports[0]}.log", env).wait_ready("/ping")

    peers.append(("torchserve", torchserve, "/predictions/anytime"))
    for label, start, path in peers:
        server = start()
        try:
            sat = _load(server.url, images, f"saturation-{label}", seconds, concurrency=16, path=path)
            fixed = _load(server.url, images, f"fixed-rate-{label}", seconds, rate=rate, path=path)
        finally:
            server.stop()
        results[label] = {
            "saturation_rps": sat["throughput_rps"], "accuracy": sat["accuracy"],
            "fixed_rate_latency_ms": {k: fixed["latency_ms"][k] for k in ("p50", "p99")},
        }  # fmt: skip
    return results


def format_table(results: dict[str, Any]) -> str:
    a, o = results["anytime_vs_full"], results["overhead"]
    p, t = results["peers"]["baseline_fastapi"], results["peers"]["torchserve"]
    fa, ff = a["fixed_rate_latency_ms"]["anytime"], a["fixed_rate_latency_ms"]["full"]
    lines = [
        "| measurement | Anytime (artifact thresholds) | same server, full depth | FastAPI baseline | TorchServe |",
        "| --- | --- | --- | --- | --- |",
        f"| saturation throughput (req/s, 16 clients) | {a['saturation_rps']['anytime']:.0f} | "
        f"{a['saturation_rps']['full']:.0f} | {p['saturation_rps']:.0f} | {t['saturation_rps']:.0f} |",
        f"| accuracy | {100 * a['accuracy']['anytime']:.2f} % | {100 * a['accuracy']['full']:.2f} % | "
        f"{100 * p['accuracy']:.2f} % | {100 * t['accuracy']:.2f} % |",
        f"| latency at {a['fixed_rate_rps']:.0f} req/s, p50 / p99 (ms) | {fa['p50']:.1f} / {fa['p99']:.1f} | "
        f"{ff['p50']:.1f} / {ff['p99']:.1f} | {p['fixed_rate_latency_ms']['p50']:.1f} / "
        f"{p['fixed_rate_latency_ms']['p99']:.1f} | {t['fixed_rate_latency_ms']['p50']:.1f} / "
        f"{t['fixed_rate_latency_ms']['p99']:.1f} |",
        "",
        f"Throughput ratio anytime / full depth: {a['throughput_ratio']:.2f}x at "
        f"{a['accuracy_loss_pp']:.2f} pp accuracy loss.",
        f"Overhead: HTTP p50 {o['http_p50_ms']:.2f} ms vs in-process decode + exit path "
        f"{o['in_process_p50_ms']:.2f} ms = {o['ratio']:.2f}x.",
        "",
        f"| deadline (ms) at {results['deadlines']['rate_rps']:.0f} req/s | attained | answered | "
        "stopped early by deadline | accuracy of answers |",
        "| --- | --- | --- | --- | --- |",
    ]
    for d, r in results["deadlines"]["by_deadline_ms"].items():
        lines.append(f"| {d} | {r['attainment']:.1%} | {r['answered']:.1%} | {r['early_by_deadline']:.1%} | "
                     f"{r['accuracy']:.2%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--name", default="fashion-mnist")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load run")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    images = fashion_mnist_pngs(args.images)
    results: dict[str, Any] = anytime_benchmarks(images, args.store, args.name, args.seconds)
    rate = results["anytime_vs_full"]["fixed_rate_rps"]
    results["peers"] = peer_benchmarks(images, args.store, args.name, args.seconds, rate)
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    results["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["command"] = "make bench"
    (OUT / "summary.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (OUT / "summary.md").write_text(table + "\n")
    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
