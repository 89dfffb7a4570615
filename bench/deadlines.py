"""Deadlines under load, for `make bench`: offered load against attainment, goodput, refusals, accuracy.

Two servers of the bundled model (pinned to the server core), one with ANYTIME_OVERLOAD=shed and one
with `degrade`; for each offered load (50, 80, 100, 120 and 150 % of the measured saturation) and
deadline (2, 5, 10, 20 ms), a Poisson run from wrk with every request timed on the client
(bench/lua/deadlines.lua), the two servers interleaved, and the server's CPU share over the run
(saturation is measured with 16 connections always busy, which batch better than Poisson arrivals:
the share shows how near the core is to full at each load). One PNG: attainment and accuracy against
offered load.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.wrk import DeadlineRun, run_deadlines
from tools.processes import ServerProcess

LOADS = (0.5, 0.8, 1.0, 1.2, 1.5)
DEADLINES_MS = (2, 5, 10, 20)
MODES = ("shed", "degrade")


def summary(cell: list[tuple[DeadlineRun, float]]) -> dict[str, Any]:
    """Medians over repetitions of one (mode, load, deadline) cell: each run with the server's CPU
    share over it (one core in all is 1.0)."""
    runs = [r for r, _ in cell]

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in runs)

    return {
        "offered_rps": med(lambda r: r.offered_rps),
        "server_cpu_busy": statistics.median(busy for _, busy in cell),
        "client_attainment": med(lambda r: r.client_attainment),
        "server_attainment": med(lambda r: r.server_attainment),
        "goodput_rps": med(lambda r: r.goodput_rps),
        "refused": med(lambda r: r.refused / max(r.requests, 1)),
        "refused_within_2ms": med(lambda r: r.refused_fast / max(r.refused, 1)),
        "refusal_max_ms": max(r.refused_max_ms for r in runs),
        "answer_max_ms": max(r.answer_max_ms for r in runs),
        "accuracy": med(lambda r: r.accuracy),
        "late_or_failed": med(lambda r: (r.ok - r.in_time + r.other + r.socket_errors) / max(r.requests, 1)),
        "exits": runs[0].exits,
        "n": len(runs),
    }


def sweep(
    store: Path,
    images: list[Path],
    labels: list[int],
    saturation: float,
    reps: int,
    seconds: float,
    server_cpu: str,
    load_cpu: int,
    log_dir: Path,
) -> dict[str, Any]:
    """The whole grid: {mode: {load: {deadline: summary}}}."""
    servers = {
        mode: ServerProcess(store, "fashion-mnist", log_dir=log_dir, cpus=server_cpu, overload=mode) for mode in MODES
    }
    runs: dict[str, dict[float, dict[int, list[tuple[DeadlineRun, float]]]]] = {
        m: {load: {d: [] for d in DEADLINES_MS} for load in LOADS} for m in MODES
    }
    try:
        for s in servers.values():
            s.wait_ready(timeout=300)
        for _ in range(reps):
            for load in LOADS:
                for d in DEADLINES_MS:
                    for mode, server in servers.items():
                        cpu, wall = server.cpu_seconds(), time.monotonic()
                        run = run_deadlines(
                            f"{server.url}/classify", images, labels, seconds, load * saturation, d, cpu=load_cpu
                        )
                        runs[mode][load][d].append((run, (server.cpu_seconds() - cpu) / (time.monotonic() - wall)))
    finally:
        for s in servers.values():
            s.stop()
    return {
        "saturation_rps": saturation,
        "loads": list(LOADS),
        "deadlines_ms": list(DEADLINES_MS),
        "by_mode": {
            m: {str(load): {str(d): summary(runs[m][load][d]) for d in DEADLINES_MS} for load in LOADS} for m in MODES
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Attainment (server and client) and accuracy against offered load, per deadline; shed solid, degrade dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [int(x * 100) for x in result["loads"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = dict(zip(result["deadlines_ms"], ("tab:red", "tab:orange", "tab:green", "tab:blue"), strict=True))
    for mode, style in (("shed", "-"), ("degrade", "--")):
        cells = result["by_mode"][mode]
        for d in result["deadlines_ms"]:
            series = [cells[str(x)][str(d)] for x in result["loads"]]
            kw = {"color": colours[d], "linestyle": style, "marker": "o", "markersize": 3}
            axes[0].plot(loads, [100 * c["server_attainment"] for c in series], label=f"{d} ms, {mode}", **kw)
            axes[1].plot(loads, [100 * c["client_attainment"] for c in series], **kw)
            axes[2].plot(loads, [100 * c["accuracy"] for c in series], **kw)
    for ax, title in zip(
        axes,
        ("answered in time, server (%)", "answered in time, client (%)", "accuracy of the answers (%)"),
        strict=True,
    ):
        ax.set_xlabel("offered load (% of saturation)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"Deadlines under load (saturation {result['saturation_rps']:.0f} req/s; shed / degrade):",
        "",
        "| load | deadline (ms) | in time, server | in time, client | goodput (req/s) | refused | refused ≤ 2 ms "
        "| accuracy | server CPU busy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for load in result["loads"]:
        for d in result["deadlines_ms"]:
            s, g = (result["by_mode"][m][str(load)][str(d)] for m in MODES)
            lines.append(
                f"| {load:.0%} | {d} | {s['server_attainment']:.1%} / {g['server_attainment']:.1%} | "
                f"{s['client_attainment']:.1%} / {g['client_attainment']:.1%} | {s['goodput_rps']:.0f} / "
                f"{g['goodput_rps']:.0f} | {s['refused']:.1%} / {g['refused']:.1%} | "
                f"{s['refused_within_2ms']:.0%} / {g['refused_within_2ms']:.0%} | "
                f"{s['accuracy']:.1%} / {g['accuracy']:.1%} | "
                f"{s['server_cpu_busy']:.0%} / {g['server_cpu_busy']:.0%} |"
            )
    return lines
