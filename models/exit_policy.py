"""The exit rule, written once: when a sample stops at an exit, and why.

Threshold selection at export, the server's engine and the benchmark all call these functions,
so what export promises is what the server does. They work on whole batches of plain NumPy
arrays (a CPU tensor's `.numpy()` is free), and import neither torch nor a web framework.

After stage k (0-based) a sample stops, for the first reason that holds, in this order:

1. ``final``: k is the last exit;
2. ``confidence``: its calibrated confidence reaches its threshold. A threshold of 1 or more
   never stops early: float32 softmax can round to exactly 1.0, and ``threshold=1`` must mean
   "always the last exit";
3. ``max_exit``: the client's 1-based `max_exit` is k + 1 or less;
4. ``deadline``: the predicted end of stage k + 1 lies past its deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import numpy as np
from numpy.typing import ArrayLike, NDArray


class Reason(StrEnum):
    """Why a sample left at the exit it did (part of the HTTP contract)."""

    CONFIDENCE = "confidence"
    DEADLINE = "deadline"
    MAX_EXIT = "max_exit"
    FINAL = "final"


# Reason codes of `decide`: GO_ON means "run the next stage"; REASONS[code] is the Reason.
GO_ON, CONFIDENCE, DEADLINE, MAX_EXIT, FINAL = 0, 1, 2, 3, 4
REASONS: tuple[Reason | None, ...] = (None, Reason.CONFIDENCE, Reason.DEADLINE, Reason.MAX_EXIT, Reason.FINAL)
NO_MAX_EXIT = 0  # in a `max_exit` array: the request named none


def reason(code: int) -> Reason:
    """The Reason of a stopping code (not GO_ON)."""
    found = REASONS[code]
    if found is None:
        raise ValueError("GO_ON is not a reason to stop")
    return found


NO_DEADLINE = np.inf  # in a `deadline` array: the request has none


def decide(
    k: int,
    num_exits: int,
    confidence: ArrayLike,
    threshold: ArrayLike,
    *,
    max_exit: ArrayLike | None = None,
    deadline: ArrayLike | None = None,
    now: float = 0.0,
    next_stage_s: float = 0.0,
) -> NDArray[np.int8]:
    """Reason code per sample for stopping after stage `k` (0-based), GO_ON to run stage k + 1.

    `confidence`, `threshold`, `max_exit` (1-based, NO_MAX_EXIT for none) and `deadline`
    (seconds, NO_DEADLINE for none) are per sample or scalars; `now` and `deadline` are on one
    clock, and `next_stage_s` is the predicted time of stage k + 1 and its exit head.
    """
    conf = np.asarray(confidence)
    n = conf.shape[0] if conf.ndim else 1
    if k >= num_exits - 1:
        return np.full(n, FINAL, dtype=np.int8)
    thr = np.asarray(threshold, dtype=np.float64)
    codes = np.where((thr < 1.0) & (conf >= thr), CONFIDENCE, GO_ON)
    if max_exit is not None:
        m = np.asarray(max_exit)
        codes = np.where((codes == GO_ON) & (m != NO_MAX_EXIT) & (k + 1 >= m), MAX_EXIT, codes)
    if deadline is not None:
        codes = np.where((codes == GO_ON) & (now + next_stage_s > np.asarray(deadline)), DEADLINE, codes)
    return np.broadcast_to(codes, (n,)).astype(np.int8)


def reachable(now: float, deadline: ArrayLike, first_stage_s: float) -> NDArray[np.bool_]:
    """Per sample, whether stage 1 and exit 1 are predicted to finish by its deadline."""
    return now + first_stage_s <= np.asarray(deadline, dtype=np.float64)


def answering_exits(conf: NDArray[np.floating], thresholds: Sequence[float] | NDArray[np.floating]) -> NDArray[np.intp]:
    """0-based exit that answers each sample under per-exit `thresholds` (no deadline, no max_exit).

    `conf` is exits × samples; `thresholds` has one value per exit, or one per shallow exit
    (the last exit always answers).
    """
    num_exits, n = conf.shape
    answered_at = np.full(n, num_exits - 1, dtype=np.intp)
    open_rows = np.ones(n, dtype=bool)
    for k in range(num_exits - 1):
        stop = open_rows & (decide(k, num_exits, conf[k], thresholds[k]) != GO_ON)
        answered_at[stop] = k
        open_rows &= ~stop
    return answered_at
