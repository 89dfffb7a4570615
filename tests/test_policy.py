"""The exit rule and the stage-time estimates: pure functions, tested exhaustively."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.exit_policy import (
    CONFIDENCE,
    DEADLINE,
    FINAL,
    GO_ON,
    MAX_EXIT,
    NO_DEADLINE,
    NO_MAX_EXIT,
    REASONS,
    Reason,
    answering_exits,
    decide,
    reachable,
)
from service.engine.timing import StageTimes

INF = NO_DEADLINE


@pytest.mark.parametrize(
    "k,conf,threshold,max_exit,now,deadline,next_s,expected",
    [
        (3, 0.1, 0.9, 0, 0.0, INF, 0.0, FINAL),  # last exit always answers
        (3, 0.99, 0.9, 2, 0.0, 0.0, 9.0, FINAL),
        (0, 0.95, 0.9, 0, 0.0, INF, 0.1, CONFIDENCE),
        (0, 0.9, 0.9, 0, 0.0, INF, 0.1, CONFIDENCE),  # reaching the threshold is enough
        (0, 0.89, 0.9, 0, 0.0, INF, 0.1, GO_ON),
        (0, 0.0, 0.0, 0, 0.0, INF, 0.1, CONFIDENCE),  # threshold 0: exit 1 always
        (0, 1.0, 1.0, 0, 0.0, INF, 0.1, GO_ON),  # threshold 1: never early, even at confidence 1.0
        (0, 1.0, 1.01, 0, 0.0, INF, 0.1, GO_ON),  # above 1 (older manifests' "never"): the same
        (1, 0.1, 0.9, 2, 0.0, INF, 0.1, MAX_EXIT),
        (0, 0.1, 0.9, 2, 0.0, INF, 0.1, GO_ON),
        (1, 0.1, 0.9, 0, 1.0, 1.15, 0.2, DEADLINE),  # next stage would end at 1.2 > 1.15
        (1, 0.1, 0.9, 0, 1.0, 1.2, 0.2, GO_ON),  # ends exactly on time: go on
        (1, 0.95, 0.9, 3, 1.0, 1.05, 0.2, CONFIDENCE),  # confidence wins over the others
        (1, 0.1, 0.9, 2, 1.0, 1.05, 0.2, MAX_EXIT),  # max_exit before deadline
    ],
)
def test_decide_cases(k, conf, threshold, max_exit, now, deadline, next_s, expected) -> None:
    codes = decide(
        k, 4, np.array([conf]), threshold, max_exit=[max_exit], deadline=[deadline], now=now,
        next_stage_s=next_s,
    )  # fmt: skip
    assert codes.tolist() == [expected]


def test_decide_over_a_grid_matches_the_rule_one_sample_at_a_time() -> None:
    """The batched rule equals the rule written out for one sample, for every combination."""
    values = [0.0, 0.5, 0.9, 1.0]
    combos = list(itertools.product(values, values, [NO_MAX_EXIT, 1, 2, 4], [INF, 0.1, 10.0]))
    conf, thr, max_exit, deadline = (np.array(c, dtype=np.float64) for c in zip(*combos, strict=True))
    for k in range(4):
        codes = decide(k, 4, conf, thr, max_exit=max_exit, deadline=deadline, now=0.0, next_stage_s=0.5)
        for (c, t, m, d), code in zip(combos, codes.tolist(), strict=True):
            if k == 3:
                want = FINAL
            elif t < 1 and c >= t:
                want = CONFIDENCE
            elif m != NO_MAX_EXIT and k + 1 >= m:
                want = MAX_EXIT
            elif 0.5 > d:
                want = DEADLINE
            else:
                want = GO_ON
            assert code == want, (k, c, t, m, d)


def test_reason_codes_name_the_http_reasons() -> None:
    assert [r.value if r else None for r in REASONS] == [None, "confidence", "deadline", "max_exit", "final"]
    assert REASONS[FINAL] is Reason.FINAL


def test_reachable() -> None:
    assert reachable(0.0, [INF, 0.1, 0.1], 0.1).tolist() == [True, True, True]
    assert reachable(0.0, [0.1], 0.11).tolist() == [False]


def test_answering_exits_takes_the_first_confident_exit() -> None:
    conf = np.array([[0.95, 0.2, 0.2, 1.0], [0.5, 0.9, 0.1, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    assert answering_exits(conf, [0.9, 0.8]).tolist() == [0, 1, 2, 0]
    assert answering_exits(conf, [0.9, 0.8, 0.0]).tolist() == [0, 1, 2, 0]  # the last threshold is ignored
    assert answering_exits(conf, [1.0, 1.0]).tolist() == [2, 2, 2, 2]  # 1: never early
    assert answering_exits(conf, [0.0, 0.0]).tolist() == [0, 0, 0, 0]


def test_stage_times_seed_interpolate_and_adapt() -> None:
    from models.artifact import ExitInfo

    profile = {"1": {"stage_ms": 2.0, "head_ms": 1.0}, "8": {"stage_ms": 10.0, "head_ms": 1.0}}
    exit_info = ExitInfo(exit=1, threshold=0.0, latency_ms=profile)
    t = StageTimes.from_manifest([exit_info])
    assert t.predict(0, 1) == pytest.approx(0.003)
    assert t.predict(0, 4) == pytest.approx(0.003 + (0.011 - 0.003) * 3 / 7)
    assert t.predict(0, 16) == pytest.approx(0.022)  # beyond the largest size: per-sample cost
    assert t.predict(1, 1) == 0.0  # no such stage
    for _ in range(50):  # the machine got twice as slow
        t.observe(0, 1, 0.006)
    assert t.predict(0, 1) == pytest.approx(0.006, rel=1e-3)
    # every remembered prediction of the stage follows (4 rows were predicted before the change)
    assert t.predict(0, 4) == pytest.approx(0.006 + (0.011 - 0.006) * 3 / 7, rel=1e-3)
    fresh = StageTimes(1)
    fresh.observe(0, 3, 0.01)
    assert fresh.predict(0, 3) == 0.01
