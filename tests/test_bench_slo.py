"""The SLO-capacity search of `make bench` (bench/slo.py), with the load runs replaced by a table."""

from __future__ import annotations

from bench.slo import RECHECK, STEPS, TARGET, highest_rate


def test_a_step_near_the_target_is_judged_on_two_runs_and_a_clear_one_on_one() -> None:
    """Below 500 req/s every run is in time; above, one in ten is late. At exactly 500 the first run
    met a stall (98.5 %), the second did not (99.9 %): pooled, 500 passes, where one run would have
    set the capacity a bisection step lower."""
    runs: list[float] = []
    second_at_500 = iter([985, 999])

    def measure(rate: float, seconds: float) -> tuple[int, int]:
        runs.append(rate)
        if rate == 500:
            return next(second_at_500), 1000
        return (1000, 1000) if rate < 500 else (900, 1000)

    found = highest_rate(measure, 1.0, hi=1000)
    assert runs.count(500) == 2 and len(runs) == STEPS + 1  # 1.0 and 0.9 are no closer than RECHECK
    assert abs(0.985 - TARGET) < RECHECK and abs(0.9 - TARGET) > RECHECK
    first = found["tried"][0]
    assert first == {"rate": 500, "in_time": 0.992, "requests": 2000, "runs": 2}
    assert 500 <= found["rps"] < 500 + 1000 / 2**STEPS
    assert [t["runs"] for t in found["tried"][1:]] == [1] * (STEPS - 1)
