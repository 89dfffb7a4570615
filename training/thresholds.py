"""Choosing per-exit confidence thresholds on held-out data.

The policy is the server's own exit rule (`models/exit_policy.py`): a sample is answered at the
first exit whose confidence reaches its threshold (a threshold of 1 never answers early), else
at the last exit. Given each sample's confidence and correctness at every exit and each exit's FLOPs (as a
fraction of the full network), `select_thresholds` finds thresholds that either minimise mean
FLOPs within an accuracy loss ε of the final exit ("accuracy" mode) or maximise accuracy within
a FLOPs budget ("budget" mode). It brute-forces a coarse grid, then refines one exit at a time
on a fine grid, so its answer is never worse than the coarse grid's best. With more shallow exits
than a grid can cover (exits at every block), it starts from uniform thresholds instead.

The accuracy loss is bounded with confidence, not just estimated: with d_i = 1 when the final
exit is right and the policy wrong, −1 for the reverse, 0 otherwise, the policy is feasible
when mean(d) + z·sd(d)/√n ≤ ε. Thresholds fitted to the point estimate alone lost twice ε on
the test set of the bundled model (0.95 pp at ε = 0.5 pp); z = 1.645 (95 %, one-sided) makes ε
a promise about unseen data rather than about the validation split. z = 0 gives the plain estimate.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from models.exit_policy import answering_exits

NEVER = 1.0  # the exit rule never answers early at a threshold of 1 or more: the exit is skipped
MAX_GRID = 25_000  # threshold vectors a coarse brute force may try (4 shallow exits at 11 values + NEVER: 20,736)


@dataclass(frozen=True)
class PolicyResult:
    """What a threshold vector gives on a data set."""

    thresholds: list[float]  # one per shallow exit; the last exit always answers
    accuracy: float  # fraction correct
    mean_flops: float  # fraction of the full network
    exit_rates: list[float]  # fraction of samples answered at each exit
    loss_bound: float = 0.0  # upper confidence bound of the accuracy loss vs the final exit


def evaluate_policy(
    conf: np.ndarray, correct: np.ndarray, flops: np.ndarray, thresholds: np.ndarray, z: float = 0.0
) -> PolicyResult:
    """Accuracy, mean FLOPs, exit distribution and loss bound (at `z` standard errors) of `thresholds`."""
    exits = answering_exits(conf, thresholds)
    n = conf.shape[1]
    answered = correct[exits, np.arange(n)]
    d = correct[-1].astype(np.float64) - answered
    bound = float(d.mean() + z * d.std(ddof=1) / np.sqrt(n)) if n > 1 else float(d.mean())
    rates = np.bincount(exits, minlength=conf.shape[0]) / n
    return PolicyResult(
        [float(t) for t in thresholds],
        float(answered.mean()),
        float(np.asarray(flops)[exits].mean()),
        [float(r) for r in rates],
        bound,
    )


def better(a: PolicyResult, b: PolicyResult | None, mode: str, limit: float) -> bool:
    """Is `a` feasible and better than `b`? (accuracy mode: `limit` = ε; budget mode: FLOPs budget)."""
    if mode == "accuracy":
        if a.loss_bound > limit + 1e-12:
            return False
        return b is None or (a.mean_flops, -a.accuracy) < (b.mean_flops, -b.accuracy)
    if a.mean_flops > limit + 1e-12:
        return False
    return b is None or (-a.accuracy, a.mean_flops) < (-b.accuracy, b.mean_flops)


def brute_force(
    conf: np.ndarray,
    correct: np.ndarray,
    flops: np.ndarray,
    grid: list[float],
    mode: str,
    limit: float,
    z: float = 0.0,
) -> PolicyResult | None:
    """The best thresholds over every combination of `grid` values (and NEVER) per shallow exit."""
    best = None
    for combo in itertools.product(sorted({*grid, NEVER}), repeat=conf.shape[0] - 1):
        r = evaluate_policy(conf, correct, flops, np.array(combo), z)
        if better(r, best, mode, limit):
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
    z: float = 1.645,
) -> PolicyResult:
    """Thresholds for `mode` "accuracy" (loss bound ≤ ε vs the final exit) or "budget" (mean FLOPs ≤ budget)."""
    if mode == "accuracy":
        limit = epsilon
    elif mode == "budget":
        if budget is None:
            raise ValueError("budget mode needs a FLOPs budget (fraction of the full network)")
        limit = budget
    else:
        raise ValueError(f"Unknown mode {mode!r}; use 'accuracy' or 'budget'")
    k = conf.shape[0] - 1
    if (coarse + 1) ** k <= MAX_GRID:
        best = brute_force(conf, correct, flops, list(np.linspace(0.0, 1.0, coarse)), mode, limit, z)
    elif 7**k <= MAX_GRID:
        best = brute_force(conf, correct, flops, list(np.linspace(0.5, 1.0, 6)), mode, limit, z)
    else:  # too many exits for a grid: start from a few uniform vectors and the final exit alone
        best = None
        for t in (*np.linspace(0.5, 0.99, 8), NEVER):
            r = evaluate_policy(conf, correct, flops, np.full(k, t), z)
            if better(r, best, mode, limit):
                best = r
    if best is None:  # nothing feasible: budget below exit 1, say; fall back to the final exit
        return evaluate_policy(conf, correct, flops, np.full(k, NEVER), z)
    thresholds = np.array(best.thresholds)
    candidates = sorted({*np.linspace(0.0, 1.0, fine).tolist(), NEVER})
    improved = True
    while improved:
        improved = False
        for i in range(k):
            for c in candidates:
                trial = thresholds.copy()
                trial[i] = c
                r = evaluate_policy(conf, correct, flops, trial, z)
                if better(r, best, mode, limit) and r != best:
                    best, thresholds, improved = r, trial, True
    return best


def agreement_by_exit(conf: np.ndarray, predicted: np.ndarray, thresholds: np.ndarray) -> list[float | None]:
    """Per exit, the share of the samples it answers under `thresholds` whose label equals the final
    exit's (None for the last exit, and for an exit that answers none). `predicted` is exits × samples."""
    exits = answering_exits(conf, thresholds)
    out: list[float | None] = []
    for k in range(conf.shape[0] - 1):
        mine = exits == k
        out.append(float((predicted[k, mine] == predicted[-1, mine]).mean()) if mine.any() else None)
    return [*out, None]
