"""The exit decision: a pure function of plain numbers (no torch, no web framework).

After stage k (0-based) a sample leaves the batch when it is at the last exit, when its
calibrated confidence reaches its threshold, when it has reached the client's `max_exit`, or
when waiting for the next stage would carry it past its deadline. A threshold of 1 or more
never exits early: float32 softmax can round to exactly 1.0, and `threshold=1` must mean
"always the last exit".
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a sample left at the exit it did (part of the HTTP contract)."""

    CONFIDENCE = "confidence"
    DEADLINE = "deadline"
    MAX_EXIT = "max_exit"
    FINAL = "final"


def decide_exit(
    k: int,
    num_exits: int,
    confidence: float,
    threshold: float,
    max_exit: int | None,
    now: float,
    deadline: float | None,
    next_stage_s: float,
) -> Reason | None:
    """The reason to stop after stage `k`, or None to go on to stage k + 1.

    `max_exit` is 1-based; `now`, `deadline` and `next_stage_s` are seconds on one clock,
    `next_stage_s` being the predicted time of stage k + 1 and its exit head.
    """
    if k >= num_exits - 1:
        return Reason.FINAL
    if threshold < 1.0 and confidence >= threshold:
        return Reason.CONFIDENCE
    if max_exit is not None and k + 1 >= max_exit:
        return Reason.MAX_EXIT
    if deadline is not None and now + next_stage_s > deadline:
        return Reason.DEADLINE
    return None


def can_reach_first_exit(now: float, deadline: float | None, first_stage_s: float) -> bool:
    """Whether stage 1 and exit 1 are predicted to finish by the deadline."""
    return deadline is None or now + first_stage_s <= deadline
