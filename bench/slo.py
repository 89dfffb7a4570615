"""SLO capacity and overload, for `make bench`: the load at which deadlines hold, and what happens past it.

For a deadline D, the **SLO capacity** is the highest Poisson arrival rate at which at least 99 % of
requests get a 200 within D on the client's clock; it is found by bisection over rates (each step one
bounded wrk run of about 1,500 requests, bench/lua/deadlines.lua, and a second one when the first
lands within a point of 99 %). It is measured for D = 10 ms and for D = 4x this machine's in-process
exit-1 p50 (so the figure travels between machines), anytime and at full depth (`threshold=1`).
Then **overload**: Poisson arrivals at 1.5x and 3x the anytime SLO capacity, and clients that resend
a refused request at once and send the next one as soon as they have an answer (closed loop, many
connections): goodput (200s within D per second) as a share of the capacity, the share of refusals
within 2 ms, and the 200s more than 1 ms after their deadline. Each configuration runs as it is, and
at half speed: a busy loop at the same priority pinned to the server's core (a neighbour on a shared
node). Servers run with one request process and with two (ANYTIME_WORKERS=2), pinned to the server
core; wrk to the other.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.wrk import DeadlineRun, run_deadlines
from tools.processes import LocalProcess, ServerProcess

TARGET = 0.99  # the share of requests in time that defines the capacity
STEPS = 6  # bisection steps per capacity
# A 99 % share judged on 400 requests has a binomial spread of 0.5 points, as wide as the margin it
# decides on; a step runs until it has sent this many requests (within STEP_CAP_S), at least `seconds`.
STEP_REQUESTS = 1500
STEP_CAP_S = 10.0
# A step whose share comes within this of the target runs once more, and is judged on both runs'
# requests together: one run that met a stall of the VM otherwise set the capacity, and every
# overload multiple with it, a bisection step below what the next run would have found.
RECHECK = 0.01
OVERLOADS = (1.5, 3.0)
RESENDERS = 64  # connections of the closed-loop clients that resend at once
FULL_DEPTH = "/classify?threshold=1"
# Exit 1 is also timed in process after this much idle before each image: a core that idles between
# requests (a VM's vCPU halts) runs the next one slower than a busy loop does, and D must cover that.
IDLE_GAP_MS = 3.0


@contextmanager
def neighbour(cpu: str, busy: bool) -> Iterator[None]:
    """A busy loop at normal priority on `cpu` while inside (when `busy`): half the core for the server."""
    proc = subprocess.Popen(["taskset", "-c", cpu, sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def _run(server: LocalProcess, images: list[Path], labels: list[int], seconds: float, rate: float, d: float,
         load_cpu: int, path: str = "/classify", connections: int | None = None
         ) -> tuple[DeadlineRun, float]:  # fmt: skip
    cpu, wall = server.cpu_seconds(), time.monotonic()
    run = run_deadlines(f"{server.url}/classify", images, labels, seconds, rate, d, load_cpu, path, connections)
    return run, (server.cpu_seconds() - cpu) / (time.monotonic() - wall)


def in_time(run: DeadlineRun) -> float:
    return run.in_time / max(run.requests + run.socket_errors, 1)


def capacity(server: LocalProcess, images: list[Path], labels: list[int], seconds: float, d: float, hi: float,
             load_cpu: int, path: str = "/classify") -> dict[str, Any]:  # fmt: skip
    """Bisection for the highest Poisson rate with >= 99 % in time within D (`highest_rate`); `hi` should fail."""

    def measure(rate: float, step_s: float) -> tuple[int, int]:
        run, _ = _run(server, images, labels, step_s, rate, d, load_cpu, path)
        return run.in_time, run.requests + run.socket_errors

    return highest_rate(measure, seconds, hi)


def highest_rate(measure: Callable[[float, float], tuple[int, int]], seconds: float, hi: float) -> dict[str, Any]:
    """The highest rate below `hi` at which `measure(rate, seconds)` (requests in time, requests sent)
    gives at least `TARGET`, in `STEPS` halvings. Each step runs `STEP_REQUESTS / rate` seconds, at least
    `seconds` and at most `STEP_CAP_S`; a share within `RECHECK` of the target is measured once more and
    judged on both runs together."""
    lo, tried = 0.0, []
    for _ in range(STEPS):
        rate = (lo + hi) / 2
        step_s = max(seconds, min(STEP_CAP_S, STEP_REQUESTS / rate))
        ok, sent = measure(rate, step_s)
        runs = 1
        if abs(ok / max(sent, 1) - TARGET) < RECHECK:
            more_ok, more_sent = measure(rate, step_s)
            ok, sent, runs = ok + more_ok, sent + more_sent, 2
        share = ok / max(sent, 1)
        tried.append({"rate": round(rate, 1), "in_time": round(share, 4), "requests": sent, "runs": runs})
        if share >= TARGET:
            lo = rate
        else:
            hi = rate
    return {"rps": lo, "tried": tried}


def overload(run: DeadlineRun, cpu_busy: float, capacity_rps: float) -> dict[str, Any]:
    return {
        "offered_rps": run.offered_rps,
        "goodput_rps": run.goodput_rps,
        "goodput_over_capacity": run.goodput_rps / capacity_rps if capacity_rps else None,  # no capacity: no share
        "refused": run.refused / max(run.requests, 1),
        "refused_within_2ms": run.refused_fast / run.refused if run.refused else None,
        "late_200s": run.late_1ms,
        "server_cpu_busy": cpu_busy,
    }


def configuration(store: Path, images: list[Path], labels: list[int], seconds: float, deadlines: dict[str, float],
                  saturation: float, workers: int, busy: bool, server_cpu: str, load_cpu: int,
                  log_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Capacities (anytime and full depth, each deadline) and overload at D = 10 ms, for one server setup."""
    server = ServerProcess(store, "fashion-mnist", log_dir=log_dir, cpus=server_cpu, workers=workers)
    out: dict[str, Any] = {"workers": workers, "half_speed": busy, "capacity": {}, "overload": {}}
    try:
        server.wait_ready(timeout=300)
        with neighbour(server_cpu, busy):
            hi = saturation / (2 if busy else 1)
            for name, d in deadlines.items():
                anytime = capacity(server, images, labels, seconds, d, hi, load_cpu)
                full = capacity(server, images, labels, seconds, d, hi, load_cpu, FULL_DEPTH)
                ratio = anytime["rps"] / full["rps"] if full["rps"] else None  # full depth met no rate
                out["capacity"][name] = {"deadline_ms": d, "anytime": anytime, "full": full, "ratio": ratio}
            d = deadlines["10ms"]
            cap = out["capacity"]["10ms"]["anytime"]["rps"]
            for factor in OVERLOADS:  # no capacity: no multiple of it to offer (None; the table says "–")
                run = _run(server, images, labels, seconds, factor * cap, d, load_cpu) if cap else None
                out["overload"][f"{factor:g}x"] = overload(*run, cap) if run else None
            resend = _run(server, images, labels, seconds, 0.0, d, load_cpu, connections=RESENDERS)
            out["overload"]["resend"] = overload(*resend, cap)
            after = _run(server, images, labels, seconds, cap, d, load_cpu) if cap else None  # at capacity right after
            out["after_overload_in_time"] = in_time(after[0]) if after else None
    finally:
        server.stop()
    return out


def sweep(store: Path, images: list[Path], labels: list[int], seconds: float, exit1_p50_ms: float, saturation: float,
          server_cpu: str, load_cpu: int, log_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Every configuration: one and two request processes, as they are and at half speed."""
    deadlines = {"10ms": 10.0, "4x_exit1": round(4 * exit1_p50_ms, 2)}
    configs = [
        configuration(store, images, labels, seconds, deadlines, saturation, w, busy, server_cpu, load_cpu, log_dir)
        for busy in (False, True)
        for w in (1, 2)
    ]
    return {"deadlines_ms": deadlines, "exit1_p50_ms": exit1_p50_ms, "saturation_rps": saturation, "runs": configs}


def field_of(run: dict[str, Any] | None, field: str) -> Any:
    """`field` of an overload run, None where the run was skipped (no capacity to take multiples of)."""
    return run[field] if run else None


def table(result: dict[str, Any]) -> list[str]:
    d = result["deadlines_ms"]
    lines = [
        f"SLO capacity (>= 99 % of requests a 200 within D, client clock; Poisson; bisection) and overload at "
        f"D = 10 ms; D = 4x exit 1 is {d['4x_exit1']:.2f} ms (in-process exit-1 p50 "
        f"{result['exit1_p50_ms']:.2f} ms; {result['exit1_after_idle_p50_ms']:.2f} ms after "
        f"{IDLE_GAP_MS:g} ms idle before each image):",
        "",
        "| setup | capacity 10 ms anytime / full (ratio) | capacity 4x exit 1 anytime / full (ratio) | goodput 1.5x "
        "| goodput 3x | goodput, resending clients | refusals ≤ 2 ms (1.5x / 3x / resend) | 200s > D + 1 ms | "
        "in time at capacity right after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        c, o = r["capacity"], r["overload"]
        setup = f"{r['workers']} request process{'es' if r['workers'] > 1 else ''}" + (
            ", half speed" if r["half_speed"] else ""
        )

        def cap(name: str, c: dict[str, Any] = c) -> str:
            x = c[name]
            ratio = "–" if x["ratio"] is None else f"{x['ratio']:.2f}"
            return f"{x['anytime']['rps']:.0f} / {x['full']['rps']:.0f} ({ratio})"

        def share(kind: str, field: str = "goodput_over_capacity", o: dict[str, Any] = o) -> str:
            x = field_of(o[kind], field)
            return "–" if x is None else f"{x:.0%}"

        after = "–" if r["after_overload_in_time"] is None else f"{r['after_overload_in_time']:.1%}"
        lines.append(
            f"| {setup} | {cap('10ms')} | {cap('4x_exit1')} | {share('1.5x')} | {share('3x')} | {share('resend')} | "
            f"{' / '.join(share(k, 'refused_within_2ms') for k in ('1.5x', '3x', 'resend'))} | "
            f"{sum(field_of(v, 'late_200s') or 0 for v in o.values())} | {after} |"
        )
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Goodput against offered load, as shares of the anytime SLO capacity at 10 ms, per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in result["runs"]:
        cap = r["capacity"]["10ms"]["anytime"]["rps"]
        if not cap:
            continue  # no capacity to state shares of
        points = [(1.0, 1.0)] + [
            (o["offered_rps"] / cap, o["goodput_over_capacity"]) for k, o in r["overload"].items() if k != "resend"
        ]
        label = f"{r['workers']} request process(es){', half speed' if r['half_speed'] else ''}"
        ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label)
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("offered load (x SLO capacity, 10 ms)")
    ax.set_ylabel("goodput (x SLO capacity)")
    ax.set_ylim(0, 1.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's criteria, per setup."""
    out = {}
    for r in result["runs"]:
        key = f"workers={r['workers']}{',half_speed' if r['half_speed'] else ''}"
        o = r["overload"]
        out[key] = {
            "capacity_ratio_10ms": r["capacity"]["10ms"]["ratio"],
            "capacity_rps_10ms": r["capacity"]["10ms"]["anytime"]["rps"],
            "goodput_over_capacity": {k: field_of(v, "goodput_over_capacity") for k, v in o.items()},
            "refusals_within_2ms": {k: field_of(v, "refused_within_2ms") for k, v in o.items()},
            "late_200s": sum(field_of(v, "late_200s") or 0 for v in o.values()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.slo`: this part of `make bench` alone (saturation and exit 1 measured first)."""
    import argparse
    import json
    import os
    import tempfile

    from bench.workloads import fashion_images
    from bench.wrk import run_wrk
    from models.artifact import resolve_artifact
    from tools.processes import ROOT

    parser = argparse.ArgumentParser(prog="python -m bench.slo", description=__doc__)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--speeds", choices=("full", "half"), nargs="+", default=["full", "half"])
    parser.add_argument("--deadline-ms", type=float, default=10.0, help="the fixed deadline (10 ms in make bench)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "slo.json")
    args = parser.parse_args(argv)
    server_cpu, load_cpu = "0", 1
    os.sched_setaffinity(0, {load_cpu})
    with tempfile.TemporaryDirectory(prefix="anytime-slo-") as tmp:
        work = Path(tmp)
        images, labels = fashion_images(work / "fmnist", 200)
        argv_ip = ["taskset", "-c", server_cpu, sys.executable, "-m", "bench.inprocess"]
        argv_ip += [str(resolve_artifact(args.store, "fashion-mnist")), str(work / "fmnist"), "--seconds", "3"]
        exit1, idle = (
            json.loads(subprocess.run([*argv_ip, "--threshold", "0", "--gap-ms", str(gap)], cwd=ROOT,
                                      capture_output=True, text=True, check=True).stdout)["p50_ms"]
            for gap in (0.0, IDLE_GAP_MS)
        )  # fmt: skip
        server = ServerProcess(args.store, "fashion-mnist", log_dir=work, cpus=server_cpu).wait_ready(timeout=300)
        try:
            saturation = run_wrk(f"{server.url}/classify", images, args.seconds, 16, cpu=load_cpu).throughput
        finally:
            server.stop()
        deadlines = {"10ms": args.deadline_ms, "4x_exit1": round(4 * exit1, 2)}
        runs = [
            configuration(
                args.store,
                images,
                labels,
                args.seconds,
                deadlines,
                saturation,
                w,
                speed == "half",
                server_cpu,
                load_cpu,
                work,
            )  # fmt: skip
            for speed in args.speeds
            for w in args.workers
        ]
    result = {"deadlines_ms": deadlines, "exit1_p50_ms": exit1, "saturation_rps": saturation, "runs": runs}
    result["exit1_after_idle_p50_ms"] = idle
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    sys.stdout.write("\n".join(table(result)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
