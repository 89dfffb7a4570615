"""`python -m training.reproduce`: standard vs DSN vs BYOT on Fashion-MNIST, same schedule and seeds.

Writes one run directory per method and seed, then a Markdown summary (mean and spread over
seeds of every exit's and the ensemble's test accuracy) with the exact command, wall time and
machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from training.config import TrainConfig
from training.trainer import Trainer

METHODS = ("standard", "dsn", "byot")


def run_all(args: argparse.Namespace) -> dict[str, list[dict[str, dict[str, float]]]]:
    """Train every method for every seed (skipping finished runs) and collect their results."""
    results: dict[str, list[dict[str, dict[str, float]]]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            out = Path(args.out_dir) / f"{method}-seed{seed}"
            done = out / "results.json"
            if not done.is_file():
                cfg = TrainConfig(
                    model=args.model, method=method, epochs=args.epochs, seed=seed, schedule=args.schedule,
                    batch_size=args.batch_size, lr=args.lr, out_dir=str(out), resume=(out / "last.pt").is_file(),
                    progress=not args.no_progress,
                )  # fmt: skip
                started = time.perf_counter()
                Trainer(cfg).fit()
                (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
            results[method].append(json.loads(done.read_text()))
    return results


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summary(results: dict[str, list[dict[str, dict[str, float]]]], args: argparse.Namespace, command: str) -> str:
    """The Markdown report: a row per method, a column per exit and the ensemble (test set)."""
    columns = list(next(iter(results.values()))[0]["test"])
    lines = ["| method | " + " | ".join(c.replace("exit", "exit ") for c in columns) + " |"]
    lines.append("|" + " --- |" * (len(columns) + 1))
    for method, runs in results.items():
        cells = [_mean_spread([r["test"][c] for r in runs]) for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    walls = []
    for method in results:
        for seed in args.seeds:
            f = Path(args.out_dir) / f"{method}-seed{seed}" / "wall_seconds.txt"
            if f.is_file():
                walls.append(f"{method} seed {seed}: {int(f.read_text()) / 60:.1f} min")
    return "\n".join(
        [
            "# Fashion-MNIST: standard vs deep supervision vs BYOT self-distillation",
            "",
            f"Model `{args.model}`, {args.epochs} epochs, {args.schedule} schedule, batch {args.batch_size}, "
            f"lr {args.lr}, seeds {', '.join(map(str, args.seeds))}. Test-set top-1 accuracy (%), "
            "checkpoint chosen by validation accuracy of the final exit (5,000 images held out of training).",
            "",
            *lines,
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'CPU'}, "
            f"torch {torch.__version__}. Wall time per run: {'; '.join(walls) or 'n/a'}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.reproduce", description=__doc__)
    parser.add_argument("--model", default="resnet_fmnist")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--schedule", choices=["multistep", "cosine"], default="cosine")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out-dir", default="runs/reproduce")
    parser.add_argument("--report", default="results/fashion_mnist.md")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    results = run_all(args)
    command = "python -m training.reproduce " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(summary(results, args, command.strip()))
    sys.stdout.write(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
