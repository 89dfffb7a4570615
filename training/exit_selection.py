"""Which exits to serve: those whose use lowers the expected cost at the chosen accuracy budget.

Every exit a request passes runs its head, whether or not the request stops there, so an exit that
few requests take costs its head for everyone who reaches it (Apparate, SOSP'24, turns exits on and
off at run time for this reason). Serving the kept exits `S`, answering at exit `e` costs the
stages up to `e` plus every kept head up to and including `e` (`served_fractions`).
`select_exits` starts from every trained exit, and drops, one at a time, the shallow exit whose
removal lowers the validation mean cost most (thresholds re-chosen each time with the server's
own exit rule, training/thresholds.py), until no removal helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from training.thresholds import PolicyResult, better, select_thresholds


def served_fractions(stage_flops: Sequence[int], head_flops: Sequence[int], kept: Sequence[int]) -> np.ndarray:
    """Per kept exit (0-based, increasing, the last included), its served cost as a fraction of the full
    network (every stage and the final head)."""
    full = sum(stage_flops) + head_flops[-1]
    out, backbone, heads = [], 0, 0
    keep = set(kept)
    for k in range(len(stage_flops)):
        backbone += stage_flops[k]
        if k in keep:
            heads += head_flops[k]
            out.append((backbone + heads) / full)
    return np.array(out)


@dataclass
class Selection:
    """The kept exits (0-based), their thresholds' result on validation, and each elimination step."""

    kept: list[int]
    result: PolicyResult
    steps: list[tuple[int | None, PolicyResult]] = field(default_factory=list)  # (dropped exit, result after)


def select_exits(
    conf: np.ndarray,
    correct: np.ndarray,
    stage_flops: Sequence[int],
    head_flops: Sequence[int],
    epsilon: float,
    mode: str = "accuracy",
    budget: float | None = None,
    z: float = 1.645,
) -> Selection:
    """Greedy backward elimination of shallow exits (see the module docstring); `conf` and `correct` are
    exits × samples on the validation split."""
    limit = epsilon if mode == "accuracy" else budget
    assert limit is not None

    def policy(kept: list[int]) -> PolicyResult:
        flops = served_fractions(stage_flops, head_flops, kept)
        return select_thresholds(conf[kept], correct[kept], flops, epsilon, mode, budget, z=z)

    kept = list(range(conf.shape[0]))
    best = policy(kept)
    steps: list[tuple[int | None, PolicyResult]] = [(None, best)]
    while len(kept) > 1:
        trials = [(policy([k for k in kept if k != e]), e) for e in kept[:-1]]
        winner: tuple[PolicyResult, int] | None = None
        for result, e in trials:
            if better(result, winner[0] if winner else None, mode, limit):
                winner = (result, e)
        if winner is None or not better(winner[0], best, mode, limit) or winner[0] == best:
            break
        best, dropped = winner
        kept = [k for k in kept if k != dropped]
        steps.append((dropped, best))
    return Selection(kept, best, steps)
