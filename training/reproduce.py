"""`python -m training.reproduce`: the Fashion-MNIST study behind `make reproduce`, and the paper's
CIFAR-100 setting behind `make reproduce-cifar100`.

Trains every method for every seed with one schedule (resumable: a finished run is skipped, an
interrupted one continues from its `last.pt`), computes each run's accuracy–compute frontier,
and writes `results/fashion_mnist.md` (per-exit and ensemble test accuracy, mean ± std over
seeds; the FLOPs each method needs to stay within 0.5 pp of the best final exit; wall times)
and `results/fashion_mnist_frontier.png` (one curve per method).

Methods: `standard` (CE at the last exit), `dsn` (CE at every exit), `byot` (the reference
code's loss: KD without T², adapter + batch-L2 hint on exits 1–2), `byot-nohint` (the same
without the hint), `byot-l2` (the ICCV paper's squared per-sample hint on every shallow exit,
KD × T²), and `ramps` (exit heads trained on the frozen `standard` network of the same seed).
With `--dataset cifar100` and ResNet-18 the report also sets the paper's Table 1 beside ours.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from training.config import TrainConfig
from training.frontier import as_dicts, flops_to_reach, from_dicts, frontier, mean_curve, plot_frontiers
from training.trainer import Trainer

VARIANTS: dict[str, dict[str, Any]] = {
    "standard": {"method": "standard"},
    "dsn": {"method": "dsn"},
    "byot": {"method": "byot", "hint": "reference"},
    "byot-nohint": {"method": "byot", "hint": "none"},
    "byot-l2": {"method": "byot", "hint": "l2", "kd_scale": "t2"},
    "ramps": {"method": "ramps"},
}
DEFAULT_METHODS = ("standard", "dsn", "byot", "byot-nohint", "ramps")


def _config(args: argparse.Namespace, variant: str, seed: int, out: Path) -> TrainConfig:
    options = dict(VARIANTS[variant])
    if variant == "ramps":
        options["init"] = str(Path(args.out_dir) / f"standard-seed{seed}" / "best.pt")
    else:
        options["model"] = args.model
    return TrainConfig(
        **options,
        dataset=args.dataset,
        data_dir=args.data_dir,
        val_size=args.val_size,
        milestones=args.milestones,
        epochs=args.epochs,
        seed=seed,
        schedule=args.schedule,
        batch_size=args.batch_size,
        lr=args.lr,
        augment=args.augment,
        out_dir=str(out),
        resume=(out / "last.pt").is_file(),
        progress=not args.no_progress,
        threads=args.threads or (max(1, (os.cpu_count() or 1) // args.parallel) if args.parallel > 1 else None),
        max_steps=args.max_steps,
        data_path=args.data_path,
        device=args.device,
    )


def run_one(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    """Train (or resume, or skip) one run, then compute its frontier once; its results.json + frontier."""
    out = Path(args.out_dir) / f"{variant}-seed{seed}"
    done, front = out / "results.json", out / "frontier.json"
    if not done.is_file():
        if variant == "ramps" and not (Path(args.out_dir) / f"standard-seed{seed}" / "results.json").is_file():
            raise SystemExit(f"ramps seed {seed} needs the standard run of that seed first (list 'standard' earlier)")
        started = time.perf_counter()
        previous = float((out / "wall_seconds.txt").read_text()) if (out / "wall_seconds.txt").is_file() else 0.0
        trainer = Trainer(_config(args, variant, seed, out))
        trainer.fit()
        (out / "wall_seconds.txt").write_text(f"{previous + time.perf_counter() - started:.0f}\n")
    if not front.is_file():
        trainer = Trainer(_config(args, variant, seed, out).model_copy(update={"resume": False}))
        trainer.model.load_state_dict(torch.load(out / "best.pt", weights_only=True)["model"])
        front.write_text(json.dumps(as_dicts(frontier(trainer.model, trainer.bundle)), indent=1))
    return {"results": json.loads(done.read_text()), "frontier": from_dicts(json.loads(front.read_text()))}


def _train_only(args: argparse.Namespace, variant: str, seed: int) -> str:
    run_one(args, variant, seed)
    return f"{variant}-seed{seed}"


def train_in_parallel(args: argparse.Namespace) -> None:
    """Train every run, `--parallel` at a time as separate processes on the same device (a GPU fills up only
    with several small runs at once); the `ramps` runs go in a second wave, after the standard runs."""
    waves = [[m for m in args.methods if m != "ramps"], [m for m in args.methods if m == "ramps"]]
    context = multiprocessing.get_context("spawn")
    for methods in waves:
        jobs = [(m, seed) for seed in args.seeds for m in methods]
        if not jobs:
            continue
        with ProcessPoolExecutor(max_workers=args.parallel, mp_context=context) as pool:
            for name in pool.map(_train_only, [args] * len(jobs), *zip(*jobs, strict=True)):
                sys.stdout.write(f"{name} done\n")


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _accuracy_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    columns = list(next(iter(runs.values()))[0]["results"]["test"])
    lines = ["| method | " + " | ".join(c.replace("exit", "exit ") for c in columns) + " |"]
    lines.append("|" + " --- |" * (len(columns) + 1))
    for method, rs in runs.items():
        cells = [_mean_spread([r["results"]["test"][c] for r in rs]) for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _paired_table(runs: dict[str, list[dict[str, Any]]], seeds: list[int]) -> list[str]:
    """Per-seed differences between methods (the same seed's data split and initialisation), every later
    method against every earlier one: the mean difference and its range over the seeds."""
    if len(seeds) < 2 or len(runs) < 2:
        return []
    columns = list(next(iter(runs.values()))[0]["results"]["test"])
    lines = [
        "Paired by seed (method a − method b, the same seed's split and initial weights; mean, and the range "
        "over seeds, in points): a difference whose range spans 0 is within the seeds' noise.",
        "",
        "| a − b | " + " | ".join(c.replace("exit", "exit ") for c in columns) + " |",
        "|" + " --- |" * (len(columns) + 1),
    ]
    methods = list(runs)
    for i, a in enumerate(methods):
        for b in methods[:i]:
            cells = []
            for c in columns:
                d = [
                    ra["results"]["test"][c] - rb["results"]["test"][c] for ra, rb in zip(runs[a], runs[b], strict=True)
                ]
                cells.append(f"{statistics.mean(d):+.2f} ({min(d):+.2f} to {max(d):+.2f})")
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines


def _frontier_table(curves: dict[str, list[dict[str, float]]], runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    last = f"exit{len(next(iter(runs.values()))[0]['frontier'][0].test_exit_rates)}"
    finals = {m: statistics.mean(r["results"]["test"][last] for r in rs) for m, rs in runs.items()}
    best_method = max(finals, key=lambda m: finals[m])
    target = finals[best_method] - 0.5
    lines = [
        f"Best final exit of any method: {best_method}, {finals[best_method]:.2f} % (mean over seeds); target "
        f"{target:.2f} % (0.5 pp below it).",
        "",
        "| method | mean FLOPs to reach the target | test accuracy at 30 % / 50 % / 70 % of full FLOPs |",
        "| --- | --- | --- |",
    ]
    for method, curve in curves.items():
        need = flops_to_reach(curve, target)
        at = []
        for budget in (0.3, 0.5, 0.7):
            under = [p for p in curve if p["flops"] <= budget + 1e-9]
            at.append(f"{max(p['accuracy'] for p in under):.2f}" if under else "–")
        lines.append(f"| {method} | {'not reached' if need is None else f'{need:.1%}'} | {' / '.join(at)} |")
    return lines


def _walls(args: argparse.Namespace, methods: list[str]) -> tuple[str, float]:
    parts, total = [], 0.0
    for method in methods:
        secs = [
            float(f.read_text())
            for seed in args.seeds
            if (f := Path(args.out_dir) / f"{method}-seed{seed}" / "wall_seconds.txt").is_file()
        ]
        total += sum(secs)
        if secs:
            parts.append(f"{method} {statistics.mean(secs) / 60:.1f} min")
    return "; ".join(parts), total


# The paper's CIFAR-100 top-1 accuracy (%), Table 1: the baseline (final exit alone) and BYOT per exit.
PAPER_CIFAR100 = {
    "resnet18": {"baseline": 77.09, "byot": [67.85, 74.57, 78.23, 78.64], "ensemble": 79.67},
    "resnet50": {"baseline": 77.68, "byot": [68.23, 74.21, 75.23, 80.56], "ensemble": 81.04},
}
TITLES = {"fashion-mnist": "Fashion-MNIST", "cifar100": "CIFAR-100", "cifar10": "CIFAR-10"}


def _paper_table(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Ours beside the paper's Table 1 (CIFAR-100, ResNet-18/50): the baseline and BYOT at each exit."""
    paper = PAPER_CIFAR100.get(args.model) if args.dataset == "cifar100" else None
    if paper is None:
        return []
    n = len(paper["byot"])
    head = "| | " + " | ".join(f"exit {k + 1}/{n}" for k in range(n)) + " | ensemble |"
    lines = ["## Beside the paper (Table 1)", "", head, "|" + " --- |" * (n + 2)]
    lines.append(f"| paper: baseline | {' | '.join(['–'] * (n - 1))} | {paper['baseline']:.2f} | – |")
    lines.append(f"| paper: BYOT | {' | '.join(f'{v:.2f}' for v in paper['byot'])} | {paper['ensemble']:.2f} |")
    for method, rs in runs.items():
        cells = [_mean_spread([r["results"]["test"][f"exit{k + 1}"] for r in rs]) for k in range(n)]
        ensemble = _mean_spread([r["results"]["test"]["ensemble"] for r in rs])
        lines.append(f"| ours: {method} | " + " | ".join(cells) + f" | {ensemble} |")
    return [*lines, ""]


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], command: str) -> str:
    """The Markdown report, and the frontier PNG beside it."""
    curves = {m: mean_curve([r["frontier"] for r in rs]) for m, rs in runs.items()}
    png = Path(args.report).with_name(Path(args.report).stem + "_frontier.png")
    title = TITLES.get(args.dataset, args.dataset)
    plot_frontiers(curves, png, f"{title}, {args.model}, {args.epochs} epochs, {len(args.seeds)} seeds")
    walls, total = _walls(args, list(runs))
    schedule = args.schedule + (f" (lr × 0.1 at {', '.join(f'{m:g}' for m in args.milestones)} of the run)"
                                if args.schedule == "multistep" else "")  # fmt: skip
    return "\n".join(
        [
            f"# {title}: {', '.join(runs)}",
            "",
            f"Model `{args.model}`, {args.epochs} epochs, {schedule} schedule, batch {args.batch_size}, "
            f"lr {args.lr}, augmentation `{args.augment}`, seeds {', '.join(map(str, args.seeds))}. Test-set top-1 "
            "accuracy (%), mean ± standard deviation over seeds; each run's checkpoint is chosen by the validation "
            "accuracy of its final exit (`ramps`: the mean of its shallow exits; "
            f"{args.val_size:,} images held out of training).",
            "",
            *_accuracy_table(runs),
            "",
            *_paired_table(runs, args.seeds),
            "",
            *_paper_table(args, runs),
            "## Accuracy–compute frontier",
            "",
            f"![frontier]({png.name})",
            "",
            "Per run, thresholds are chosen on the validation split for 20 mean-FLOPs budgets (the server's exit "
            "rule, temperatures fitted on validation); the curve is the test accuracy and mean FLOPs they give, "
            "averaged over seeds budget by budget (band: ±1 std). FLOPs are what serving costs: every head "
            "before the exit taken ran too, so a network that answers only from its final exit pays over 100 %.",
            "",
            *_frontier_table(curves, runs),
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.machine()}, {args.threads or torch.get_num_threads()} torch threads, torch "
            f"{torch.__version__}. Mean wall time per run: {walls}; {total / 3600:.1f} h in all.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.reproduce", description=__doc__)
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "cifar10", "cifar100"])
    parser.add_argument("--data-dir", help="where the data set lives (CIFAR: the extracted python version)")
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    parser.add_argument("--milestones", type=float, nargs="+", default=[0.5, 0.75], help="multistep: fractions")
    parser.add_argument("--model", default="resnet_fmnist_narrow")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_METHODS))
    parser.add_argument("--schedule", choices=["multistep", "cosine"], default="cosine")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--augment", default="standard")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    parser.add_argument("--out-dir", default="runs/reproduce")
    parser.add_argument("--report", default="results/fashion_mnist.md")
    parser.add_argument("--max-steps", type=int, help="cap on steps per epoch (smoke runs)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once, as processes (one device)")
    parser.add_argument("--data-path", choices=["auto", "tensor", "loader"], default="auto")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    if "ramps" in args.methods and "standard" not in args.methods:
        parser.error("ramps trains exits on the standard runs: list 'standard' too")
    if args.parallel > 1:
        train_in_parallel(args)
    order = sorted(args.methods, key=lambda m: m == "ramps")  # ramps after the standard runs it builds on
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in order:
            runs[method].append(run_one(args, method, seed))
    command = "python -m training.reproduce " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(args, runs, command.strip()))
    sys.stdout.write(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
