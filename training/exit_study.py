"""`python -m training.exit_study`: accuracy–compute frontiers of networks with different exit points.

Each `LABEL=PATH` is a trainer checkpoint or an artifact directory of a Fashion-MNIST network; for
each, thresholds are chosen on the validation split for a grid of served-FLOPs budgets (every head
a request passes counted) and reported on the test split (training/frontier.py). Writes a Markdown
table (per-exit test accuracy, the FLOPs each needs to stay within 0.5 pp of the best final exit,
accuracy at fixed budgets) and one PNG with every curve.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from training.data import load_data
from training.evaluate import accuracies, collect_logits
from training.frontier import flops_to_reach, frontier, mean_curve, plot_frontiers
from training.trainer import load_trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.exit_study", description=__doc__)
    parser.add_argument("runs", nargs="+", help="LABEL=PATH (checkpoint .pt or artifact directory)")
    parser.add_argument("--report", type=Path, default=Path("results/exit_points.md"))
    parser.add_argument("--steps", type=int, default=20, help="budgets on the frontier")
    args = parser.parse_args(argv)
    import torch
    from torch.utils.data import DataLoader

    torch.set_grad_enabled(False)
    bundle = load_data("fashion-mnist", allow_download=False)
    curves, finals, rows = {}, {}, []
    for item in args.runs:
        label, _, path = item.partition("=")
        model, spec = load_trained(path)
        model.eval()
        logits, y = collect_logits(model, DataLoader(bundle.test, batch_size=1000), torch.device("cpu"))
        acc = accuracies(logits, y)
        finals[label] = acc[f"exit{model.num_exits}"]
        curves[label] = mean_curve([frontier(model, bundle, args.steps)])
        blocks = model.exit_blocks or list(range(1, model.num_exits + 1))
        exits = ", ".join(f"{b}: {acc[f'exit{k + 1}']:.2f}" for k, b in enumerate(blocks))
        rows.append((label, spec.kwargs.get("exit_style", "conv"), exits))
    best = max(finals, key=lambda k: finals[k])
    target = finals[best] - 0.5
    png = args.report.with_name(args.report.stem + "_frontier.png")
    plot_frontiers(curves, png, "Fashion-MNIST: exits per stage vs exits at blocks (served FLOPs)")
    lines = [
        "# Exits where they pay: one exit per stage against exits at every block",
        "",
        "Test top-1 accuracy (%) of each exit, by the block it follows:",
        "",
        "| network | heads | test accuracy by exit (after block: %) |",
        "| --- | --- | --- |",
        *[f"| {label} | {style} | {exits} |" for label, style, exits in rows],
        "",
        f"![frontier]({png.name})",
        "",
        f"Best final exit: {best}, {finals[best]:.2f} %; target {target:.2f} % (0.5 pp below). Mean FLOPs are "
        "served FLOPs (an answer at exit k pays the stages and every head up to k), as a share of the plain "
        "network's.",
        "",
        "| network | served FLOPs to reach the target | test accuracy at 20 % / 25 % / 35 % / 50 % of the FLOPs |",
        "| --- | --- | --- |",
    ]
    for label, curve in curves.items():
        need = flops_to_reach(curve, target)
        at = []
        for budget in (0.2, 0.25, 0.35, 0.5):
            under = [p for p in curve if p["flops"] <= budget + 1e-9]
            at.append(f"{max(p['accuracy'] for p in under):.2f}" if under else "–")
        lines.append(f"| {label} | {'not reached' if need is None else f'{need:.1%}'} | {' / '.join(at)} |")
    command = "python -m training.exit_study " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"Command: `{command}`", ""]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines))
    sys.stdout.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
