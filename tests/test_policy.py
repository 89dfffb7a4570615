"""The exit decision and the stage-time estimates: pure functions, tested exhaustively."""

from __future__ import annotations

import itertools

import pytest

from service.policy import Reason, can_reach_first_exit, decide_exit
from service.timing import StageTimes


@pytest.mark.parametrize(
    "k,conf,threshold,max_exit,now,deadline,next_s,expected",
    [
        (3, 0.1, 0.9, None, 0.0, None, 0.0, Reason.FINAL),  # last exit always answers
        (3, 0.99, 0.9, 2, 0.0, 0.0, 9.0, Reason.FINAL),
        (0, 0.95, 0.9, None, 0.0, None, 0.1, Reason.CONFIDENCE),
        (0, 0.9, 0.9, None, 0.0, None, 0.1, Reason.CONFIDENCE),  # reaching the threshold is enough
        (0, 0.89, 0.9, None, 0.0, None, 0.1, None),
        (0, 0.0, 0.0, None, 0.0, None, 0.1, Reason.CONFIDENCE),  # threshold 0: exit 1 always
        (0, 1.0, 1.0, None, 0.0, None, 0.1, None),  # threshold 1: never early, even at confidence 1.0
        (1, 0.1, 0.9, 2, 0.0, None, 0.1, Reason.MAX_EXIT),
        (0, 0.1, 0.9, 2, 0.0, None, 0.1, None),
        (1, 0.1, 0.9, None, 1.0, 1.15, 0.2, Reason.DEADLINE),  # next stage would end at 1.2 > 1.15
        (1, 0.1, 0.9, None, 1.0, 1.2, 0.2, None),  # ends exactly on time: go on
        (1, 0.95, 0.9, 3, 1.0, 1.05, 0.2, Reason.CONFIDENCE),  # confidence wins over the others
        (1, 0.1, 0.9, 2, 1.0, 1.05, 0.2, Reason.MAX_EXIT),  # max_exit before deadline
    ],
)
def test_decide_exit_cases(k, conf, threshold, max_exit, now, deadline, next_s, expected) -> None:  # type: ignore[no-untyped-def]
    assert decide_exit(k, 4, conf, threshold, max_exit, now, deadline, next_s) == expected


def test_decide_exit_invariants_over_a_grid() -> None:
    values = [0.0, 0.5, 0.9, 1.0]
    for k, conf, thr, max_exit, dl in itertools.product(range(4), values, values, [None, 1, 2, 4], [None, 0.1, 10.0]):
        r = decide_exit(k, 4, conf, thr, max_exit, 0.0, dl, 0.5)
        if k == 3:
            assert r is Reason.FINAL
        elif r is None:  # going on is only allowed when nothing says stop
            assert not (thr < 1 and conf >= thr)
            assert max_exit is None or k + 1 < max_exit
            assert dl is None or 0.5 <= dl


def test_can_reach_first_exit() -> None:
    assert can_reach_first_exit(0.0, None, 5.0)
    assert can_reach_first_exit(0.0, 0.1, 0.1)
    assert not can_reach_first_exit(0.0, 0.1, 0.11)


def test_stage_times_seed_interpolate_and_adapt() -> None:
    exits = [{"latency_ms": {"1": {"stage_ms": 2.0, "head_ms": 1.0}, "8": {"stage_ms": 10.0, "head_ms": 1.0}}}]
    t = StageTimes.from_manifest(exits)
    assert t.predict(0, 1) == pytest.approx(0.003)
    assert t.predict(0, 4) == pytest.approx(0.003 + (0.011 - 0.003) * 3 / 7)
    assert t.predict(0, 16) == pytest.approx(0.022)  # beyond the largest size: per-sample cost
    assert t.predict(1, 1) == 0.0  # no such stage
    for _ in range(50):  # the machine got twice as slow
        t.observe(0, 1, 0.006)
    assert t.predict(0, 1) == pytest.approx(0.006, rel=1e-3)
    fresh = StageTimes(1)
    fresh.observe(0, 3, 0.01)
    assert fresh.predict(0, 3) == 0.01
