"""The accuracy–compute frontier of a trained multi-exit network.

For a grid of mean-FLOPs budgets (served cost: an answer at exit k pays every head up to k), thresholds
are chosen on the validation split (the exit rule
of `models/exit_policy.py`, budget mode of `select_thresholds`, temperatures fitted on
validation) and the test split reports what they give: one (mean FLOPs, test accuracy) point
per budget. Averaging the points of several seeds budget by budget gives a method's curve.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.confidence import confidence
from models.cost import exit_costs
from models.multi_exit import MultiExitNet
from training.calibration import fit_temperature
from training.data import DataBundle
from training.evaluate import collect_logits
from training.thresholds import evaluate_policy, select_thresholds


@dataclass(frozen=True)
class FrontierPoint:
    """Thresholds chosen on validation for `budget`, and what they give on the test set."""

    budget: float  # mean FLOPs allowed, fraction of the full network
    thresholds: list[float]
    test_accuracy: float  # %
    test_mean_flops: float  # fraction of the full network
    test_exit_rates: list[float]


def budgets(first_exit_fraction: float, steps: int = 20, last: float = 1.0) -> list[float]:
    """An even grid from the cheapest exit's cost to `last` (the final exit's served cost)."""
    return [round(float(b), 4) for b in np.linspace(first_exit_fraction, max(last, 1.0), steps)]


def frontier(model: MultiExitNet, bundle: DataBundle, steps: int = 20) -> list[FrontierPoint]:
    """The frontier of `model` on `bundle`'s validation (choice) and test (report) splits."""
    model.eval()
    device = next(model.parameters()).device
    val_z, val_y = collect_logits(model, DataLoader(bundle.val, batch_size=512), device)
    test_z, test_y = collect_logits(model, DataLoader(bundle.test, batch_size=512), device)
    temps = [fit_temperature(z, val_y) for z in val_z]

    def conf_correct(logits: list[torch.Tensor], y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        conf = torch.stack([confidence(z, t) for z, t in zip(logits, temps, strict=True)]).numpy()
        return conf, torch.stack([z.argmax(1) == y for z in logits]).numpy()

    (vc, vk), (tc, tk) = conf_correct(val_z, val_y), conf_correct(test_z, test_y)
    shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
    flops = np.array([c.served_flops_fraction for c in exit_costs(model, shape)])  # every passed head counted
    points = []
    for budget in budgets(float(flops[0]), steps, float(flops[-1])):
        chosen = select_thresholds(vc, vk, flops, mode="budget", budget=budget + 1e-9, fine=101)
        on_test = evaluate_policy(tc, tk, flops, np.array(chosen.thresholds))
        points.append(
            FrontierPoint(budget, chosen.thresholds, on_test.accuracy * 100, on_test.mean_flops, on_test.exit_rates)
        )
    return points


def mean_curve(runs: list[list[FrontierPoint]]) -> list[dict[str, float]]:
    """Budget by budget: mean and standard deviation over runs of test accuracy, mean FLOPs."""
    curve = []
    for points in zip(*runs, strict=True):
        acc = [p.test_accuracy for p in points]
        curve.append(
            {
                "budget": points[0].budget,
                "flops": statistics.mean(p.test_mean_flops for p in points),
                "accuracy": statistics.mean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            }
        )
    return curve


def flops_to_reach(curve: list[dict[str, float]], target: float) -> float | None:
    """Least mean FLOPs at which the curve's mean test accuracy reaches `target` (%), or None."""
    ok = [p["flops"] for p in curve if p["accuracy"] >= target]
    return min(ok) if ok else None


def plot_frontiers(curves: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    """One PNG, one curve per method (mean over seeds, ±1 std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, curve in curves.items():
        xs = [p["flops"] for p in curve]
        ys = np.array([p["accuracy"] for p in curve])
        sd = np.array([p["accuracy_std"] for p in curve])
        ax.plot(xs, ys, "o-", markersize=3, label=name)
        ax.fill_between(xs, ys - sd, ys + sd, alpha=0.15)
    top = max(p["accuracy"] for curve in curves.values() for p in curve)
    ax.set_ylim(top - 6, top + 0.5)  # untrained exits (standard's) would squash the interesting part
    ax.set(xlabel="mean FLOPs (fraction of the full network)", ylabel="test top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def as_dicts(points: list[FrontierPoint]) -> list[dict]:
    return [asdict(p) for p in points]


def from_dicts(rows: list[dict]) -> list[FrontierPoint]:
    return [FrontierPoint(**r) for r in rows]
