"""Choosing per-exit confidence thresholds on held-out data.

The policy answers at the first exit whose confidence reaches its threshold, else at the last
exit. Given each sample's confidence and correctness at every exit and each exit's FLOPs (as a
fraction of the full network), `select_thresholds` finds thresholds that either minimise mean
FLOPs within an accuracy loss ε of the final exit ("accuracy" mode) or maximise accuracy within
a FLOPs budget ("budget" mode). It brute-forces a coarse grid, then refines one exit at a time
on a fine grid, so its answer is never worse than the coarse grid's best.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

NEVER = 1.01  # a threshold no confidence reaches: the exit is skipped


@dataclass(frozen=True)
class PolicyResult:
    """What a threshold vector gives on a data set."""

    thresholds: list[float]  # one per shallow exit; the last exit always answers
    accuracy: float  # fraction correct
    mean_flops: float  # fraction of the full network
    exit_rates: list[float]  # fraction of samples answered at each exit


def policy_exits(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the exit that answers each sample. `conf` is exits × samples."""
    hit = conf[:-1] >= np.asarray(thresholds)[:, None]
    hit = np.vstack([hit, np.ones((1, conf.shape[1]), dtype=bool)])
    return hit.argmax(axis=0)


def evaluate_policy(conf: np.ndarray, correct: np.ndarray, flops: np.ndarray, thresholds: np.ndarray) -> PolicyResult:
    """Accuracy, mean FLOPs and exit distribution of `thresholds`."""
    exits = policy_exits(conf, thresholds)
    cols = np.arange(conf.shape[1])
    rates = np.bincount(exits, minlength=conf.shape[0]) / conf.shape[1]
    return PolicyResult(
        [float(t) for t in thresholds],
        float(correct[exits, cols].mean()),
        float(np.asarray(flops)[exits].mean()),
        [float(r) for r in rates],
    )


def _better(a: PolicyResult, b: PolicyResult | None, mode: str, target: float) -> bool:
    """Is `a` feasible and better than `b`? (accuracy mode: target accuracy; budget: target FLOPs)."""
    if mode == "accuracy":
        if a.accuracy < target - 1e-12:
            return False
        return b is None or (a.mean_flops, -a.accuracy) < (b.mean_flops, -b.accuracy)
    if a.mean_flops > target + 1e-12:
        return False
    return b is None or (-a.accuracy, a.mean_flops) < (-b.accuracy, b.mean_flops)


def brute_force(
    conf: np.ndarray, correct: np.ndarray, flops: np.ndarray, grid: list[float], mode: str, target: float
) -> PolicyResult | None:
    """The best thresholds over every combination of `grid` values (and NEVER) per shallow exit."""
    best = None
    for combo in itertools.product([*grid, NEVER], repeat=conf.shape[0] - 1):
        r = evaluate_policy(conf, correct, flops, np.array(combo))
        if _better(r, best, mode, target):
            best = r
    return best


def select_thresholds(
    conf: np.ndarray,
    correct: np.ndarray,
    flops: np.ndarray,
    epsilon: float = 0.005,
    mode: str = "accuracy",
    budget: float | None = None,
    coarse: int = 11,
    fine: int = 201,
) -> PolicyResult:
    """Thresholds for `mode` "accuracy" (loss ≤ ε vs the final exit) or "budget" (mean FLOPs ≤ budget)."""
    if mode == "accuracy":
        target = float(correct[-1].mean()) - epsilon
    elif mode == "budget":
        if budget is None:
            raise ValueError("budget mode needs a FLOPs budget (fraction of the full network)")
        target = budget
    else:
        raise ValueError(f"Unknown mode {mode!r}; use 'accuracy' or 'budget'")
    k = conf.shape[0] - 1
    coarse_grid = list(np.linspace(0.0, 1.0, coarse)) if k <= 4 else list(np.linspace(0.5, 1.0, 6))
    best = brute_force(conf, correct, flops, coarse_grid, mode, target)
    if best is None:  # nothing feasible: budget below exit 1, say; fall back to the final exit
        return evaluate_policy(conf, correct, flops, np.full(k, NEVER))
    thresholds = np.array(best.thresholds)
    candidates = [*np.linspace(0.0, 1.0, fine), NEVER]
    improved = True
    while improved:
        improved = False
        for i in range(k):
            for c in candidates:
                trial = thresholds.copy()
                trial[i] = c
                r = evaluate_policy(conf, correct, flops, trial)
                if _better(r, best, mode, target) and r != best:
                    best, thresholds, improved = r, trial, True
    return best
