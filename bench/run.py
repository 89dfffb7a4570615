"""`make bench`: the request path and the anytime savings, measured so that a ratio can be trusted.

Every server is pinned to core 0 with one torch thread, the load generator (wrk, compiled) to
core 1; everything binds 127.0.0.1 and every run is bounded in time. Each comparison is made of
interleaved repetitions (A, B, A, B, …) and reported as the median with its min–max spread.
Cost is also reported as the server's CPU time (user + system, /proc) per answered request,
which the machine's drift disturbs least.

1. HTTP overhead: one client's HTTP p50 against the in-process path (decode + the engine's exit
   path, `bench/inprocess.py`, pinned to the same core), on the same 200 Fashion-MNIST images.
2. Anytime vs full depth on the bundled model: saturation throughput (16 connections) and CPU
   per request, with the artifact's thresholds and with `threshold=1`.
3. Realized efficiency on compute-bound networks (resnet18 3x32x32, resnet50 3x224x224, random
   weights; and resnet18 with the bundled model's exit points under its exit shares): exits forced
   by `max_exit` drawn from an exit mix; CPU saved over FLOPs saved, and speed-up over the ideal.
4. Deadlines (bench/slo.py): the SLO capacity (the highest Poisson rate with >= 99 % of requests
   a 200 within D) at D = 10 ms and 4x the in-process exit-1 p50, anytime and full depth; overload
   at 1.5x and 3x of it and from clients that resend at once; with one and two request processes,
   as they are and at half speed (a busy neighbour on the server's core); `slo.png`.
   And the two process models side by side (ANYTIME_WORKERS=1 and 2): saturation, CPU per
   request, one client's p50, Poisson at 80 % of saturation with 10 ms budgets.
5. Peers at full depth (a plain FastAPI endpoint, TorchServe): p50, saturation, CPU per request, and
   their SLO capacity at both deadlines (the rate with >= 99 % of 200s within D), as for Anytime.

Results: `bench/results/summary.json` (with a `headline` object) and `summary.md`, and the table
on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import slo
from bench.workloads import (
    NETWORKS,
    OIP_HEAD,
    bundled_exits_network,
    fashion_images,
    mean_flops,
    mix_paths,
    oip_bodies,
    random_weight_artifact,
    rgb_images,
)
from bench.wrk import WrkResult, run_deadlines, run_wrk
from models.artifact import read_manifest, resolve_artifact
from tools.processes import ROOT, LocalProcess, ServerProcess, free_port

OUT = ROOT / "bench" / "results"
SERVER_CPU, LOAD_CPU = "0", 1


def spread(values: list[float]) -> dict[str, float]:
    """Median and min–max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _answers(server: LocalProcess) -> float:
    """Samples the server's engine has taken into batches so far (anytime_batch_size_sum): every one of
    them is computed, including those whose client hung up when a run ended."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("anytime_batch_size_sum"))


def _wait_idle(server: LocalProcess, timeout: float = 30.0) -> None:
    """Until the server's CPU time stops growing: the work in flight when the load stopped is done."""
    end, last = time.monotonic() + timeout, -1.0
    while time.monotonic() < end:
        now = server.cpu_seconds()
        if now == last:
            return
        last = now
        time.sleep(0.25)


def metered(server: LocalProcess, run: Callable[[], WrkResult], counted: bool = True) -> tuple[WrkResult, float]:
    """A wrk run and the server's CPU milliseconds per request, the run's tail included.

    `counted`: the server counts the samples it computed (Anytime); otherwise (peers) wrk's answers.
    """
    _wait_idle(server)
    cpu, answered = server.cpu_seconds(), _answers(server) if counted else 0.0
    result = run()
    _wait_idle(server)
    done = _answers(server) - answered if counted else result.ok
    return result, (server.cpu_seconds() - cpu) * 1e3 / max(done, 1)


def in_process(
    artifact: Path, images: Path, seconds: float, threshold: float | None = None, gap_ms: float = 0.0
) -> dict[str, Any]:
    argv = ["taskset", "-c", SERVER_CPU, sys.executable, "-m", "bench.inprocess", str(artifact), str(images)]
    argv += ["--seconds", str(seconds), "--gap-ms", str(gap_ms)]
    argv += ["--threshold", str(threshold)] if threshold is not None else []
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120, check=True)
    return json.loads(out.stdout)


def evaluate_in_process(artifact: Path, images: Path, threshold: float | None) -> dict[str, Any]:
    labels = images.parent / f"{images.name}-labels.json"
    argv = [sys.executable, "-m", "bench.inprocess", str(artifact), str(images), "--evaluate", str(labels)]
    argv += ["--threshold", str(threshold)] if threshold is not None else []
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def _serve(store: Path, name: str, **settings: Any) -> ServerProcess:
    """A server for the runs whose CPU is metered, without the keep-warm (ANYTIME_KEEP_WARM_MS=0): it runs
    only while the worker idles, so never during these runs, but for 30 s after each one, which `metered`
    would wait out and count against the run's requests. The SLO runs (bench/slo.py) keep it on."""
    server = ServerProcess(store, name, log_dir=OUT, cpus=SERVER_CPU, **({"keep_warm_ms": 0} | settings))
    server.wait_ready(timeout=300)
    return server


def bundled(store: Path, images: list[Path], image_dir: Path, reps: int, seconds: float) -> dict[str, Any]:
    """1, 2 and 4: overhead, anytime vs full depth, deadlines, on the bundled model."""
    artifact = resolve_artifact(store, "fashion-mnist")
    flops = [e.flops_fraction or 1.0 for e in read_manifest(artifact).exits]
    server = _serve(store, "fashion-mnist")
    url = f"{server.url}/classify"
    try:
        run_wrk(url, images, 2, 16, cpu=LOAD_CPU)  # warm-up
        overhead, http_p50, inproc_p50 = [], [], []
        for _ in range(reps):
            http = run_wrk(url, images, seconds, 1, cpu=LOAD_CPU)
            local = in_process(artifact, image_dir, seconds)
            http_p50.append(http.p50_ms)
            inproc_p50.append(local["p50_ms"])
            overhead.append(http.p50_ms / local["p50_ms"])
        runs: dict[str, list[tuple[WrkResult, float]]] = {"anytime": [], "full": []}
        for _ in range(reps):
            for label, path in (("anytime", "/classify"), ("full", "/classify?threshold=1")):
                runs[label].append(
                    metered(server, lambda p=path: run_wrk(url, images, seconds, 16, paths=[p], cpu=LOAD_CPU))
                )
        saturation = statistics.median(r.throughput for r, _ in runs["anytime"])
        protocols = _protocols(server, images, image_dir.parent / "oip", reps, seconds)
    finally:
        server.stop()
    exits: dict[str, int] = {}
    for r, _ in runs["anytime"]:
        for e, c in r.exits.items():
            exits[e] = exits.get(e, 0) + c
    taken = sum(exits.values())
    mean_taken = sum(flops[int(e) - 1] * c for e, c in exits.items()) / taken
    return {
        "overhead": {
            "ratio": spread(overhead),
            "http_p50_ms": spread(http_p50),
            "in_process_p50_ms": spread(inproc_p50),
        },
        "saturation": {
            label: {
                "throughput_rps": spread([r.throughput for r, _ in rs]),
                "cpu_ms_per_request": spread([cpu for _, cpu in rs]),
                "p50_ms": spread([r.p50_ms for r, _ in rs]),
            }
            for label, rs in runs.items()
        },
        "throughput_ratio": spread(
            [a.throughput / f.throughput for (a, _), (f, _) in zip(*runs.values(), strict=True)]
        ),
        "cpu_ratio": spread([ca / cf for (_, ca), (_, cf) in zip(*runs.values(), strict=True)]),
        "exit_shares": {e: c / taken for e, c in sorted(exits.items())},
        "protocols": protocols,
        "ideal_speedup": 1 / mean_taken,
        "saturation_rps": saturation,
    }


def process_models(store: Path, images: list[Path], labels: list[int], reps: int, seconds: float) -> dict[str, Any]:
    """ANYTIME_WORKERS=1 and 2 side by side (servers interleaved run by run): saturation (16 connections), CPU
    per request, one client's p50, and Poisson arrivals at 80 % of the one-process saturation with 10 ms
    budgets (in time on the client's clock, and 200s more than 1 ms late)."""
    servers = {w: _serve(store, "fashion-mnist", workers=w) for w in (1, 2)}
    runs: dict[int, dict[str, list[float]]] = {w: {"rps": [], "cpu": [], "p50": [], "in_time": [], "late": []}
                                               for w in servers}  # fmt: skip
    try:
        for server in servers.values():
            run_wrk(f"{server.url}/classify", images, 2, 16, cpu=LOAD_CPU)  # warm-up
        for _ in range(reps):
            for w, server in servers.items():
                r, cpu = metered(
                    server, lambda s=server: run_wrk(f"{s.url}/classify", images, seconds, 16, cpu=LOAD_CPU)
                )
                one = run_wrk(f"{server.url}/classify", images, seconds, 1, cpu=LOAD_CPU)
                runs[w]["rps"].append(r.throughput)
                runs[w]["cpu"].append(cpu)
                runs[w]["p50"].append(one.p50_ms)
        rate = 0.8 * statistics.median(runs[1]["rps"])
        for _ in range(reps):
            for w, server in servers.items():
                d = run_deadlines(f"{server.url}/classify", images, labels, seconds, rate, 10.0, cpu=LOAD_CPU)
                runs[w]["in_time"].append(d.client_attainment)
                runs[w]["late"].append(d.late_1ms)
    finally:
        for server in servers.values():
            server.stop()
    return {str(w): {k: spread(v) for k, v in r.items()} | {"rate_80": rate} for w, r in runs.items()}


def _protocols(server: LocalProcess, images: list[Path], work: Path, reps: int, seconds: float) -> dict[str, Any]:
    """/classify (raw PNG body) vs the Open Inference Protocol's binary path, the same images, interleaved."""
    bodies = oip_bodies(work, images)
    oip_path = "/v2/models/fashion-mnist/infer"
    header = f"Inference-Header-Content-Length: {OIP_HEAD}"
    kinds = {
        "classify": lambda c: run_wrk(f"{server.url}/classify", images, seconds, c, cpu=LOAD_CPU),
        "v2_binary": lambda c: run_wrk(
            server.url + oip_path,
            bodies,
            seconds,
            c,
            paths=[oip_path],
            cpu=LOAD_CPU,
            content_type="application/octet-stream",
            header=header,
        ),
    }
    p50: dict[str, list[float]] = {k: [] for k in kinds}
    rps: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(reps):
        for kind, run in kinds.items():
            single = run(1)
            if single.ok != single.requests:
                raise RuntimeError(f"{kind}: {single.requests - single.ok} requests failed: {single.status}")
            p50[kind].append(single.p50_ms)
            rps[kind].append(run(16).throughput)
    return {
        **{f"{k}_p50_ms": spread(v) for k, v in p50.items()},
        **{f"{k}_throughput_rps": spread(v) for k, v in rps.items()},
        "v2_over_classify_p50": spread([a / b for a, b in zip(p50["v2_binary"], p50["classify"], strict=True)]),
        "v2_over_classify_throughput": spread([a / b for a, b in zip(rps["v2_binary"], rps["classify"], strict=True)]),
    }


def shadow_cost(store: Path, images: list[Path], reps: int, seconds: float, rate: float) -> dict[str, Any]:
    """p99 at 80 % load with shadow checks off (ANYTIME_SHADOW_RATE=0) and at 0.01, interleaved."""
    servers = {label: _serve(store, "fashion-mnist", shadow_rate=r) for label, r in (("off", 0), ("0.01", 0.01))}
    p99: dict[str, list[float]] = {label: [] for label in servers}
    checks: dict[str, float] = {}
    try:
        for _ in range(reps):
            for label, server in servers.items():
                p99[label].append(
                    run_wrk(f"{server.url}/classify", images, seconds, 64, rate=rate, cpu=LOAD_CPU).p99_ms
                )
        for label, server in servers.items():
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            checks[label] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("anytime_shadow_samples_total{")
            )
    finally:
        for server in servers.values():
            server.stop()
    return {
        "rate_rps": rate,
        "p99_ms": {k: spread(v) for k, v in p99.items()},
        "shadow_checks_run": checks,
        "p99_ratio": spread([a / b for a, b in zip(p99["0.01"], p99["off"], strict=True)]),
    }


def realized(work: Path, bundled_artifact: Path, reps: int, seconds: float) -> dict[str, Any]:
    """3: CPU per request at full depth vs exit mixes, against the FLOPs the mix saves.

    Realized efficiency is CPU time saved over FLOPs saved, (1 - CPU mix / CPU full) / (1 - FLOPs mix),
    as bench.gpu reports time saved; the speed-up against the ideal one is reported beside it."""
    results: dict[str, Any] = {}
    for net in (*NETWORKS, bundled_exits_network(bundled_artifact)):
        store = work / "store"
        artifact = random_weight_artifact(store, net)
        flops = [e.flops_fraction or 1.0 for e in read_manifest(artifact).exits]
        images = rgb_images(work / f"images-{net.name}", 64, net.size)
        length = seconds * net.run_scale
        plans = {"full": ["/classify"], **{name: mix_paths(mix) for name, mix in net.mixes.items()}}
        server = _serve(store, net.name, max_batch=net.max_batch)
        url = f"{server.url}/classify"
        cpu: dict[str, list[float]] = {name: [] for name in plans}
        try:
            run_wrk(url, images, 1, 16, cpu=LOAD_CPU)  # warm-up
            for _ in range(reps):
                for name, paths in plans.items():
                    _, ms = metered(
                        server,
                        lambda u=url, i=images, p=paths, s=length: run_wrk(u, i, s, 16, paths=p, cpu=LOAD_CPU),
                    )
                    cpu[name].append(ms)
        finally:
            server.stop()
        for name, paths in plans.items():
            if name == "full":
                continue
            fraction = mean_flops(paths, flops)
            pairs = list(zip(cpu["full"], cpu[name], strict=True))
            results[f"{net.name}/{name}"] = {
                "efficiency": spread([(1 - mix / full) / (1 - fraction) for full, mix in pairs]),
                "speedup_over_ideal": spread([(full / mix) * fraction for full, mix in pairs]),
                "ideal_speedup": 1 / fraction,
                "exits": len(flops),
                "cpu_ms_per_request": {"full": spread(cpu["full"]), "mix": spread(cpu[name])},
            }
    return results


def peers(
    store: Path, images: list[Path], labels: list[int], seconds: float, deadlines: dict[str, float]
) -> dict[str, Any]:
    """5: a plain FastAPI endpoint and TorchServe serving the bundled model at full depth: one client's
    p50, saturation, CPU per request, and the SLO capacity at each deadline of `slo` (the highest
    Poisson rate with >= 99 % of requests a 200 within D on the client's clock, as for Anytime)."""
    artifact = resolve_artifact(store, "fashion-mnist")
    results: dict[str, Any] = {}
    port = free_port()
    baseline = [
        sys.executable,
        "-m",
        "bench.peers.baseline",
        "--store",
        str(store),
        "--name",
        "fashion-mnist",
        "--port",
        str(port),
    ]
    starts: list[tuple[str, Callable[[], LocalProcess], str]] = [
        (
            "fastapi_baseline",
            lambda: LocalProcess(
                baseline, port, OUT / f"server-{port}.log", {"PYTHONPATH": str(ROOT)}, SERVER_CPU
            ).wait_ready("/docs"),
            "/classify",
        )
    ]
    if Path(sys.executable).with_name("torchserve").exists():
        ports = [free_port() for _ in range(5)]

        def torchserve() -> LocalProcess:
            from bench.peers.torchserve.launch import prepare

            work = Path(tempfile.mkdtemp(prefix="torchserve-"))
            argv = prepare(artifact, work, ports)
            env = {"PYTHONPATH": str(ROOT), "LOG_LOCATION": str(work), "METRICS_LOCATION": str(work)}
            server = LocalProcess(argv, ports[0], OUT / f"server-{ports[0]}.log", env, SERVER_CPU)
            return server.wait_ready("/ping", timeout=300)

        starts.append(("torchserve", torchserve, "/predictions/anytime"))
    for label, start, path in starts:
        server = start()
        try:
            url, paths = server.url + path, [path]
            run_wrk(url, images, 2, 16, paths=paths, cpu=LOAD_CPU)
            single = run_wrk(url, images, seconds, 1, paths=paths, cpu=LOAD_CPU)
            sat, cpu = metered(
                server, lambda u=url, p=paths: run_wrk(u, images, seconds, 16, paths=p, cpu=LOAD_CPU), counted=False
            )
            capacity = {
                name: slo.capacity(server, images, labels, seconds, d, 2 * sat.throughput, LOAD_CPU, path)["rps"]
                for name, d in deadlines.items()
            }
        finally:
            server.stop()
        results[label] = {
            "p50_ms_one_client": single.p50_ms if single.requests else None,  # None: no answer in the window
            "throughput_rps": sat.throughput,
            "cpu_ms_per_request": cpu,
            "slo_capacity_rps": capacity,
        }
    return results


def headline(b: dict[str, Any], r: dict[str, Any], s: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    return {
        "slo": slo.headline(s),
        "peers_slo_capacity_rps": {name: v["slo_capacity_rps"] for name, v in p.items()},
        "http_overhead_ratio": b["overhead"]["ratio"]["median"],
        "throughput_ratio_vs_full": b["throughput_ratio"]["median"],
        "cpu_per_request_ratio_vs_full": b["cpu_ratio"]["median"],
        "ideal_speedup": b["ideal_speedup"],
        "realized_efficiency": {k: v["efficiency"]["median"] for k, v in r.items()},
        "spreads": {
            "http_overhead_ratio": [b["overhead"]["ratio"]["min"], b["overhead"]["ratio"]["max"]],
            "throughput_ratio_vs_full": [b["throughput_ratio"]["min"], b["throughput_ratio"]["max"]],
            "cpu_per_request_ratio_vs_full": [b["cpu_ratio"]["min"], b["cpu_ratio"]["max"]],
            "realized_efficiency": {k: [v["efficiency"]["min"], v["efficiency"]["max"]] for k, v in r.items()},
        },
    }


def _cell(s: dict[str, float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def format_table(results: dict[str, Any]) -> str:
    b, r, p = results["bundled"], results["realized"], results["peers"]
    sat, h = b["saturation"], results["headline"]
    lines = [
        f"Median of {b['overhead']['ratio']['n']} interleaved repetitions (min–max); server pinned to core "
        f"{SERVER_CPU} with 1 torch thread, wrk on core {LOAD_CPU}.",
        "",
        "| bundled model | anytime (artifact thresholds) | full depth (threshold=1) | ratio |",
        "| --- | --- | --- | --- |",
        f"| saturation, 16 connections (req/s) | {_cell(sat['anytime']['throughput_rps'], '{:.0f}')} | "
        f"{_cell(sat['full']['throughput_rps'], '{:.0f}')} | {_cell(b['throughput_ratio'])} |",
        f"| server CPU per request (ms) | {_cell(sat['anytime']['cpu_ms_per_request'])} | "
        f"{_cell(sat['full']['cpu_ms_per_request'])} | {_cell(b['cpu_ratio'])} |",
        f"| ideal speed-up from the exits taken | {h['ideal_speedup']:.2f}x | 1x | |",
        "",
        f"HTTP overhead: one client's HTTP p50 {_cell(b['overhead']['http_p50_ms'])} ms vs in-process decode + exit "
        f"path {_cell(b['overhead']['in_process_p50_ms'])} ms: ratio {_cell(b['overhead']['ratio'])}.",
        "",
        "| realized efficiency (CPU saved / FLOPs saved) | median (min–max) | speed-up / ideal | ideal speed-up "
        "| CPU ms full → mix |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, v in r.items():
        c = v["cpu_ms_per_request"]
        lines.append(
            f"| {name} ({v['exits']} exits) | {_cell(v['efficiency'])} | {_cell(v['speedup_over_ideal'])} | "
            f"{v['ideal_speedup']:.2f}x | {c['full']['median']:.2f} → {c['mix']['median']:.2f} |"
        )
    pr = b["protocols"]
    lines += [
        "",
        "| protocol (bundled model) | p50, one client (ms) | saturation, 16 connections (req/s) |",
        "| --- | --- | --- |",
        f"| `POST /classify`, PNG body | {_cell(pr['classify_p50_ms'])} | "
        f"{_cell(pr['classify_throughput_rps'], '{:.0f}')} |",
        f"| `POST /v2/models/…/infer`, binary tensor data | {_cell(pr['v2_binary_p50_ms'])} | "
        f"{_cell(pr['v2_binary_throughput_rps'], '{:.0f}')} |",
        f"| v2 / classify | {_cell(pr['v2_over_classify_p50'])} | {_cell(pr['v2_over_classify_throughput'])} |",
    ]
    sh = b["shadow"]
    lines += [
        "",
        f"Drift guard at {sh['rate_rps']:.0f} req/s (80 %): p99 {_cell(sh['p99_ms']['off'])} ms with shadow "
        "checks off, "
        f"{_cell(sh['p99_ms']['0.01'])} ms at ANYTIME_SHADOW_RATE=0.01 (ratio {_cell(sh['p99_ratio'])}); "
        f"{sh['shadow_checks_run']['0.01']:.0f} checks ran.",
    ]
    lines += ["", *slo.table(results["slo"])]
    pm = results["process_models"]
    lines += [
        "",
        f"Process models side by side (Poisson at {pm['1']['rate_80']:.0f} req/s, 80 % of one process's saturation, "
        "10 ms budgets):",
        "",
        "| ANYTIME_WORKERS | saturation (req/s) | CPU per request (ms) | p50, one client (ms) | in time, client "
        "| 200s > D + 1 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for w, v in pm.items():
        lines.append(
            f"| {w} | {_cell(v['rps'], '{:.0f}')} | {_cell(v['cpu'])} | {_cell(v['p50'])} | "
            f"{_cell(v['in_time'], '{:.1%}')} | {_cell(v['late'], '{:.0f}')} |"
        )
    if p:
        d = results["slo"]["deadlines_ms"]
        one = next((x for x in results["slo"]["runs"] if x["workers"] == 1 and not x["half_speed"]), None)
        full_cap = " | ".join(f"{one['capacity'][k]['full']['rps']:.0f}" if one else "–" for k in d)
        lines += [
            "",
            "| full depth, one run each | p50, one client (ms) | saturation (req/s) | CPU per request (ms) | "
            + " | ".join(f"SLO capacity {v:g} ms (req/s)" for v in d.values())
            + " |",
            "| --- | --- | --- | --- |" + " --- |" * len(d),
            f"| Anytime, threshold=1 | – | {sat['full']['throughput_rps']['median']:.0f} | "
            f"{sat['full']['cpu_ms_per_request']['median']:.2f} | {full_cap} |",
        ]
        for name, v in p.items():
            caps = " | ".join(f"{v['slo_capacity_rps'][k]:.0f}" for k in d)
            p50 = "–" if v["p50_ms_one_client"] is None else f"{v['p50_ms_one_client']:.2f}"
            lines.append(f"| {name} | {p50} | {v['throughput_rps']:.0f} | {v['cpu_ms_per_request']:.2f} | {caps} |")
    return "\n".join(lines)


def _pin_self() -> None:
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("make bench pins the server and the load generator to different cores: it needs 2")
    os.sched_setaffinity(0, {LOAD_CPU})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each comparison")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--images", type=int, default=200, help="Fashion-MNIST test images sent round robin")
    parser.add_argument("--no-peers", action="store_true", help="skip the FastAPI baseline and TorchServe")
    args = parser.parse_args(argv)
    _pin_self()
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="anytime-bench-") as tmp:
        work = Path(tmp)
        images, labels = fashion_images(work / "fmnist", args.images)
        evaluation = {
            "anytime": evaluate_in_process(resolve_artifact(args.store, "fashion-mnist"), work / "fmnist", None),
            "full": evaluate_in_process(resolve_artifact(args.store, "fashion-mnist"), work / "fmnist", 1.0),
        }
        results: dict[str, Any] = {"bundled": bundled(args.store, images, work / "fmnist", args.reps, args.seconds)}
        results["bundled"]["in_process_evaluation"] = evaluation
        saturation = results["bundled"]["saturation_rps"]
        results["bundled"]["shadow"] = shadow_cost(args.store, images, args.reps, args.seconds, 0.8 * saturation)
        artifact = resolve_artifact(args.store, "fashion-mnist")
        exit1 = in_process(artifact, work / "fmnist", args.seconds, 0.0)
        idle = in_process(artifact, work / "fmnist", args.seconds, 0.0, slo.IDLE_GAP_MS)
        results["slo"] = slo.sweep(
            args.store, images, labels, args.seconds, exit1["p50_ms"], saturation, SERVER_CPU, LOAD_CPU, OUT
        )
        results["slo"]["exit1_after_idle_p50_ms"] = idle["p50_ms"]
        slo.plot(results["slo"], OUT / "slo.png")
        results["process_models"] = process_models(args.store, images, labels, max(1, args.reps // 2), args.seconds)
        results["realized"] = realized(work, resolve_artifact(args.store, "fashion-mnist"), args.reps, args.seconds)
        deadlines = results["slo"]["deadlines_ms"]
        results["peers"] = {} if args.no_peers else peers(args.store, images, labels, args.seconds, deadlines)
    results["headline"] = headline(results["bundled"], results["realized"], results["slo"], results["peers"])
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "unknown",
        ),
        "server_cpu": SERVER_CPU,
        "load_cpu": LOAD_CPU,
        "torch_threads": 1,
    }
    results["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["wall_seconds"] = round(time.monotonic() - started)
    results["command"] = "make bench"
    (OUT / "summary.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (OUT / "summary.md").write_text(table + "\n")
    sys.stdout.write(table + "\n\n" + json.dumps(results["headline"], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
