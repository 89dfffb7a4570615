"""`python -m bench.gpu` (`make bench-gpu`): does the engine keep the early exits' savings on this device?

One run, JSON + a printed table, machine and versions in the header. On CUDA (at most about five
minutes on an H200) it measures; on a CPU (`--smoke`, or no GPU) the same code runs at small sizes
so CI can smoke it.

1. Bundled model, in process: one job at a time (p50), and saturation with 4 x `max_batch` jobs
   kept queued, anytime (the artifact's thresholds) against full depth (`threshold=1`), at two
   batch buckets. The driver is a thread that submits to the engine's real worker and counts the
   answers its sink receives: no event loop in the way.
2. Ceilings on the same device: the whole network as one batched forward (no decisions), and each
   stage (+ exit + confidence) run by the engine's own stage runner on full batches (CUDA graphs on
   CUDA), from which full depth's best throughput and the ideal anytime / full of the exit mix
   served follow: what stage-level batching could at best reach.
3. A compute-bound network (ResNet-50 at 224x224 on CUDA, ResNet-18 at 32x32 on CPU), random
   weights, `max_exit` drawn from two exit mixes: throughput against full depth, and realized
   efficiency = time saved / FLOPs saved; its per-stage times at batch 1, 8 and 64.
4. With `--http` (and Debian's wrk): the server over HTTP (`/classify` and the Open Inference
   Protocol's binary REST form), saturation and one client's p50, anytime and full depth, with
   ANYTIME_WORKERS request processes; `--independent N` measures N single-process servers side by
   side (each its own engine) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from models.artifact import load_artifact, resolve_artifact
from models.cost import exit_costs
from models.exit_policy import NO_MAX_EXIT
from service.engine import Engine, EngineConfig, Job
from service.engine.jobs import Outcome
from service.engine.runner import CudaGraphRunner, EagerRunner
from service.metrics import Metrics
from service.options import InferenceOptions
from tools.processes import ROOT

OUT = ROOT / "bench" / "results"
MIXES = {"87/5/8/0": (0.87, 0.05, 0.08, 0.0), "40/30/20/10": (0.40, 0.30, 0.20, 0.10)}


class Counter:
    """The sink of the driven jobs: counts answers (and their exits), wakes the feeder."""

    def __init__(self, limit: int) -> None:
        self.answered = 0
        self.failed = 0
        self.exits: dict[int, int] = {}
        self.free = threading.Semaphore(limit)
        self.done = threading.Event()

    def deliver(self, settled: list[tuple[Job, Outcome]]) -> None:
        for job, outcome in settled:
            job.done = True
            if isinstance(outcome, BaseException):
                self.failed += 1
            else:
                self.answered += 1
                self.exits[outcome.exit] = self.exits.get(outcome.exit, 0) + 1
            self.free.release()
        self.done.set()

    def passed(self, jobs: list[Job]) -> None:
        """Nothing to do: every job here is answered by the engine itself."""


def _options(threshold: float | None, max_exit: int | None) -> InferenceOptions:
    return InferenceOptions.now(threshold=threshold, max_exit=max_exit)


def saturate(
    engine: Engine,
    xs: list[torch.Tensor],
    seconds: float,
    threshold: float | None = None,
    max_exits: list[int] | None = None,
) -> dict[str, Any]:
    """Images per second with 4 x max_batch jobs kept queued (after a warm-up of a tenth of the time)."""
    sink = Counter(4 * engine.max_batch)
    start, counted_from, i, t0 = time.monotonic(), 0, 0, None
    warm = start + seconds * 0.1
    end = warm + seconds
    while time.monotonic() < end:
        if not sink.free.acquire(timeout=0.5):
            continue
        if t0 is None and time.monotonic() >= warm:
            counted_from, t0 = sink.answered, time.monotonic()
        max_exit = max_exits[i % len(max_exits)] if max_exits else None
        job = Job(xs[i % len(xs)], _options(threshold, None if max_exit == NO_MAX_EXIT else max_exit))
        i += 1
        try:
            engine.submit_to(job, sink)
        except Exception:
            sink.free.release()
            time.sleep(0.0005)
    t0 = t0 or time.monotonic()
    while sink.answered == counted_from and time.monotonic() < end + 30:  # a slow machine: at least one answer
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    done = sink.answered - counted_from
    while sink.answered + sink.failed < i and time.monotonic() < end + 30:
        time.sleep(0.01)
    return {"images_per_s": done / elapsed, "exits": dict(sorted(sink.exits.items())), "failed": sink.failed}


def one_at_a_time(engine: Engine, xs: list[torch.Tensor], count: int, threshold: float | None = None) -> float:
    """Median milliseconds from submit to answer, one job at a time."""
    times = []
    for i in range(count + 20):
        sink = Counter(1)
        job = Job(xs[i % len(xs)], _options(threshold, None))
        t0 = time.perf_counter()
        engine.submit_to(job, sink)
        sink.done.wait(30)
        if i >= 20:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after five warm-up runs."""
    for _ in range(5):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(engine: Engine, batch: int, reach: list[float], repeats: int) -> dict[str, Any]:
    """The plain batched forward, and each stage run by the engine's stage runner on full batches."""
    runner, device = engine.runner, engine.device
    shape = (engine.input.channels, engine.input.size, engine.input.size)
    x = torch.randn(batch, *shape)
    model = runner.model
    xd = runner.to_device(x)
    with torch.inference_mode(), runner.autocast():
        plain = _timed(lambda: model(xd), device, repeats)
    graphed = isinstance(runner, CudaGraphRunner) and runner.bucket(batch) == batch
    h = runner.load([x[i] for i in range(batch)])
    stage_s = []
    for k in range(engine.num_exits):
        out = runner.run(k, h)
        stage_s.append(_timed(lambda k=k, h=h: runner.run(k, h), device, repeats))
        if out.h is not None:
            h = out.h
    full = batch / sum(stage_s)
    ideal = sum(stage_s) / sum(r * t for r, t in zip(reach, stage_s, strict=True))
    return {
        "batch": batch,
        "plain_forward_images_per_s": batch / plain,
        "stage_ms": [t * 1e3 for t in stage_s],
        "stage_runner": "cuda graphs" if graphed else "eager",
        "full_depth_images_per_s": full,
        "ideal_anytime_over_full": ideal,
    }


def reach_of(exits: dict[int, int], num_exits: int) -> list[float]:
    """Share of rows that run each stage, from an exit count."""
    total = sum(exits.values()) or 1
    return [sum(c for e, c in exits.items() if e >= k + 1) / total for k in range(num_exits)]


def _engine(artifact_dir: Path, device: torch.device, max_batch: int, graphs: bool = True) -> Engine:
    artifact = load_artifact(artifact_dir)
    m = artifact.manifest
    config = EngineConfig(max_batch=max_batch, queue_size=64 * max_batch, cuda_graphs=graphs, aging_ms=20)
    engine = Engine(artifact, device, Metrics().for_model(m.name, m.version, str(device)), config)
    engine.start(warmup=True)
    return engine


def fashion_tensors(artifact_dir: Path, count: int) -> list[torch.Tensor]:
    from client.loadgen import fashion_mnist_pngs
    from models.preprocess import Preprocess
    from service.images import decode_image

    spec = load_artifact(artifact_dir).manifest.input
    tf = Preprocess(spec)
    return [decode_image(png, spec, tf, 10**7) for png, _ in fashion_mnist_pngs(count)]


def bundled(store: Path, device: torch.device, buckets: tuple[int, int], seconds: float, repeats: int) -> dict:
    artifact = resolve_artifact(store, "fashion-mnist")
    xs = fashion_tensors(artifact, 1000)
    out: dict[str, Any] = {
        "artifact": str(artifact.relative_to(ROOT)) if artifact.is_relative_to(ROOT) else str(artifact)
    }
    engine = _engine(artifact, device, buckets[0])
    try:
        out["one_job_p50_ms"] = {
            "anytime": one_at_a_time(engine, xs, 200),
            "full": one_at_a_time(engine, xs, 200, threshold=1.0),
        }
    finally:
        engine.stop(5)
    for b in buckets:
        engine = _engine(artifact, device, b)
        try:
            runs = {"anytime": [], "full": []}
            for _ in range(3):  # interleaved
                runs["anytime"].append(saturate(engine, xs, seconds))
                runs["full"].append(saturate(engine, xs, seconds, threshold=1.0))
            ratios = [a["images_per_s"] / f["images_per_s"] for a, f in zip(runs["anytime"], runs["full"], strict=True)]
            exits = runs["anytime"][0]["exits"]
            out[f"bucket_{b}"] = {
                "anytime_images_per_s": [r["images_per_s"] for r in runs["anytime"]],
                "full_images_per_s": [r["images_per_s"] for r in runs["full"]],
                "ratio": ratios,
                "exits": exits,
                "ceiling": ceilings(engine, b, reach_of(exits, engine.num_exits), repeats),
            }
        finally:
            engine.stop(5)
    return out


def compute_bound(work: Path, device: torch.device, smoke: bool, seconds: float, repeats: int) -> dict:
    """ResNet-50 (ResNet-18 on CPU) with random weights: exit mixes against full depth."""
    from bench.workloads import Network, random_weight_artifact

    cuda = device.type == "cuda"
    net = (
        Network("resnet50", "resnet50", 224, "imagenet", 1000, 64, 1.0)
        if cuda and not smoke
        else Network("resnet18", "resnet18", 32, "cifar", 100, 8, 1.0)
    )
    artifact = random_weight_artifact(work, net)
    flops = [c.flops_fraction for c in exit_costs(load_artifact(artifact).model, (3, net.size, net.size))]
    xs = [torch.randn(3, net.size, net.size) for _ in range(64)]
    engine = _engine(artifact, device, net.max_batch)
    out: dict[str, Any] = {"network": f"{net.model} 3x{net.size}x{net.size}", "batch": net.max_batch}
    try:
        rng = random.Random(0)
        plans = {"full": None, **{m: rng.choices(range(1, 5), weights=w, k=4096) for m, w in MIXES.items()}}
        measured: dict[str, list[float]] = {name: [] for name in plans}
        for _ in range(2):
            for name, max_exits in plans.items():
                measured[name].append(saturate(engine, xs, seconds, threshold=1.0, max_exits=max_exits)["images_per_s"])
        full = statistics.median(measured["full"])
        out["full_images_per_s"] = full
        for name, w in MIXES.items():
            mix = statistics.median(measured[name])
            mean_flops = sum(f * p for f, p in zip(flops, w, strict=True))
            out[name] = {
                "images_per_s": mix,
                "over_full": mix / full,
                "realized_efficiency": (1 - full / mix) / (1 - mean_flops),
                "ideal_over_full": 1 / mean_flops,
            }
        runner = engine.runner
        out["stage_ms_by_batch"] = stage_times(runner, xs, (1, 8, net.max_batch), engine.num_exits, device, repeats)
        out["stage_runner"] = "cuda graphs" if isinstance(runner, CudaGraphRunner) else "eager"
        if cuda:  # the same stages launched eagerly: the launch overhead the graphs remove
            out["eager_stage_ms_by_batch"] = stage_times(
                EagerRunner(runner.model, device, runner.temperatures, runner.measure),
                xs,
                (1, 8, net.max_batch),
                engine.num_exits,
                device,
                repeats,
            )
    finally:
        engine.stop(5)
    return out


def stage_times(
    runner: EagerRunner,
    xs: list[torch.Tensor],
    batches: tuple[int, ...],
    num_exits: int,
    device: torch.device,
    repeats: int,
) -> dict[str, list[float]]:
    """Milliseconds of each stage (+ exit + confidence) by batch size, as the runner runs it."""
    out = {}
    for b in batches:
        if isinstance(runner, CudaGraphRunner) and runner.bucket(b) != b:
            continue
        h = runner.load([xs[i % len(xs)] for i in range(b)])
        times = []
        for k in range(num_exits):
            times.append(_timed(lambda k=k, h=h: runner.run(k, h), device, repeats) * 1e3)
            nxt = runner.run(k, h).h
            h = nxt if nxt is not None else h
        out[str(b)] = times
    return out


def http_rows(store: Path, seconds: float, workers: int, independent: int) -> dict[str, Any]:
    """The server over HTTP with wrk: /classify and v2 binary, saturation and one client, anytime and full."""
    from bench.workloads import OIP_HEAD, fashion_images, oip_bodies
    from bench.wrk import run_wrk
    from tools.processes import ServerProcess

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    images, _ = fashion_images(work / "fmnist", 200)
    bodies = oip_bodies(work / "oip", images)
    out: dict[str, Any] = {"workers": workers}
    server = ServerProcess(store, "fashion-mnist", log_dir=work, workers=workers).wait_ready(timeout=300)
    try:
        url = f"{server.url}/classify"
        run_wrk(url, images, 2, 64)
        for label, path in (("anytime", "/classify"), ("full", "/classify?threshold=1")):
            out[f"classify_{label}_rps"] = run_wrk(url, images, seconds, 128, paths=[path]).throughput
            out[f"classify_{label}_one_client_p50_ms"] = run_wrk(url, images, seconds, 1, paths=[path]).p50_ms
        v2 = "/v2/models/fashion-mnist/infer"
        header = f"Inference-Header-Content-Length: {OIP_HEAD}"
        out["v2_binary_rps"] = run_wrk(
            server.url + v2, bodies, seconds, 128, paths=[v2], content_type="application/octet-stream", header=header
        ).throughput
        text = __import__("httpx").get(f"{server.url}/metrics").text
        out["metrics_sample"] = [ln for ln in text.splitlines() if ln.startswith("anytime_stage_seconds_sum")]
    finally:
        server.stop()
    if independent > 1:
        servers = [ServerProcess(store, "fashion-mnist", log_dir=work, workers=1) for _ in range(independent)]
        try:
            for s in servers:
                s.wait_ready(timeout=300)
            results: list[float] = []
            threads = [
                threading.Thread(
                    target=lambda s=s: results.append(
                        run_wrk(f"{s.url}/classify", images, seconds, max(1, 128 // independent)).throughput
                    )
                )
                for s in servers
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[f"independent_{independent}_servers_classify_anytime_rps"] = sum(results)
        finally:
            for s in servers:
                s.stop()
    return out


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return info


def _range(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def format_table(r: dict[str, Any]) -> str:
    b = r["bundled"]
    lines = [
        f"bench.gpu on {r['machine']['device']} (torch {r['machine']['torch']}, CUDA {r['machine']['cuda']}, "
        f"{r['machine']['cpus']} CPUs), {r['date']}; median (min–max) of 3 interleaved runs.",
        "",
        "| bundled model | anytime | full depth | anytime / full | ceiling: stage runner, full batches "
        "| plain forward |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| one job at a time, p50 (ms) | {b['one_job_p50_ms']['anytime']:.3f} | {b['one_job_p50_ms']['full']:.3f} | "
        "| | |",
    ]
    for key in sorted(k for k in b if k.startswith("bucket_")):
        v, c = b[key], b[key]["ceiling"]
        lines.append(
            f"| saturation, bucket {key.split('_')[1]} (img/s) | {_range(v['anytime_images_per_s'])} | "
            f"{_range(v['full_images_per_s'])} | {_range(v['ratio'], '{:.2f}')} | "
            f"full {c['full_depth_images_per_s']:.0f}, "
            f"ideal anytime / full {c['ideal_anytime_over_full']:.2f} ({c['stage_runner']}) | "
            f"{c['plain_forward_images_per_s']:.0f} |"
        )
    cb = r["compute_bound"]
    lines += [
        "",
        f"| {cb['network']}, batch {cb['batch']}, `max_exit` from a mix | img/s | over full | ideal "
        "| realized efficiency |",
        "| --- | --- | --- | --- | --- |",
        f"| full depth | {cb['full_images_per_s']:.0f} | 1 | 1 | |",
    ]
    for name in MIXES:
        v = cb[name]
        lines.append(
            f"| {name} | {v['images_per_s']:.0f} | {v['over_full']:.2f} | {v['ideal_over_full']:.2f} | "
            f"{v['realized_efficiency']:.2f} |"
        )
    lines += [
        "",
        f"Per-stage ms ({cb['stage_runner']}) by batch: "
        + "; ".join(f"{bs}: " + ", ".join(f"{t:.3f}" for t in ts) for bs, ts in cb["stage_ms_by_batch"].items()),
    ]
    if "http" in r:
        h = r["http"]
        lines += [
            "",
            f"HTTP, {h['workers']} request processes: /classify {h['classify_anytime_rps']:.0f} req/s anytime, "
            f"{h['classify_full_rps']:.0f} full; one client p50 {h['classify_anytime_one_client_p50_ms']:.2f} / "
            f"{h['classify_full_one_client_p50_ms']:.2f} ms; v2 binary {h['v2_binary_rps']:.0f} req/s.",
        ]
        for k, v in h.items():
            if k.startswith("independent_"):
                lines.append(f"{k.replace('_', ' ')}: {v:.0f} req/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--smoke", action="store_true", help="small sizes and short runs (CI, CPU)")
    parser.add_argument("--seconds", type=float, help="length of each saturation run")
    parser.add_argument("--http", action="store_true", help="also measure over HTTP with wrk")
    parser.add_argument("--workers", type=int, default=0, help="ANYTIME_WORKERS for the HTTP rows (0: the default)")
    parser.add_argument("--independent", type=int, default=0, help="also N single-process servers side by side")
    parser.add_argument("--out", type=Path, default=OUT / "gpu.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    seconds = args.seconds or (0.5 if smoke else 4.0)
    buckets = (8, 32) if smoke else (64, 256)
    repeats = 5 if smoke else 50
    torch.set_grad_enabled(False)
    if device.type == "cpu":
        torch.set_num_threads(1)
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine(device),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    results["bundled"] = bundled(args.store, device, buckets, seconds, repeats)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        results["compute_bound"] = compute_bound(Path(tmp), device, smoke, seconds, repeats)
    if args.http:
        results["http"] = http_rows(args.store, seconds, args.workers, args.independent)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    sys.stdout.write(format_table(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
