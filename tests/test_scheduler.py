"""The stage scheduler on its own: earliest deadline first, aging, merging, admission, expiry.

Stage times are set by hand and the clock is a number the test moves, so every decision is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from service.engine.admission import Admission, Holds, precheck_forecast
from service.engine.brownout import Brownout
from service.engine.jobs import DeadlineUnreachable, Job, QueueFull
from service.engine.limit import InflightLimit, allows
from service.engine.scheduler import Chunk, Scheduler
from service.engine.timing import STALE_S, AnswerMargin, StageTimes
from service.options import InferenceOptions
from service.workers.ipc import ForecastBoard, ModelState
from service.workers.remote import RemoteEngine

STAGE_S = [0.010, 0.010, 0.010]  # every stage takes 10 ms at any batch size here


def _scheduler(max_batch: int = 4, aging_s: float = 0.5, stages: int = 3) -> Scheduler:
    times = StageTimes(stages)
    for k in range(stages):
        times.set(k, 1, STAGE_S[k])
        times.set(k, max_batch, STAGE_S[k])
    return Scheduler(stages, max_batch, times, lambda n: n, aging_s, queue_size=100)


def _job(received: float, budget_s: float | None = None, cap_s: float = 30.0) -> Job:
    deadline = received + (budget_s if budget_s is not None else cap_s)
    options = InferenceOptions(received=received, deadline=deadline, client_deadline=budget_s is not None)
    return Job(torch.zeros(1), options)


def _chunk(stage: int, jobs: list[Job]) -> Chunk:
    n = len(jobs)
    return Chunk(
        stage, jobs, torch.zeros(n, 2), torch.full((n, 3), 1 / 3), np.full(n, 0.5),
        np.array([j.plan_by for j in jobs]), np.array([min(j.deadline, j.options.received + 0.5) for j in jobs]),
    )  # fmt: skip


def test_new_jobs_are_taken_earliest_deadline_first() -> None:
    s = _scheduler(max_batch=2)
    late, soon, no_deadline = _job(0.0, 0.300), _job(0.0, 0.050), _job(0.0)
    for job in (no_deadline, late, soon):
        s.add(job)
    first = s.plan(0.0).batch
    assert first is not None and first.stage == 0 and first.jobs == [soon, late]
    second = s.plan(0.01).batch
    assert second is not None and second.jobs == [no_deadline]


def test_a_job_without_deadline_is_aged_and_cannot_starve() -> None:
    """Arrived at 0 with aging 0.5 s, it goes before deadline jobs that arrive later with later deadlines."""
    s = _scheduler(max_batch=1, aging_s=0.5)
    old = _job(0.0)
    s.add(old)
    s.add(_job(0.2, 0.1))  # due at 0.3: goes first
    assert s.plan(0.2).batch.jobs != [old]
    for t in (0.3, 0.4):
        s.add(_job(t, 0.35))  # due at 0.65 and 0.75: after the old job's 0.5
    batch = s.plan(0.45).batch
    assert batch is not None and batch.jobs == [old]


def test_rows_that_go_on_merge_into_full_batches_at_deeper_stages() -> None:
    s = _scheduler(max_batch=4)
    jobs = [_job(0.0) for _ in range(8)]
    s.put(_chunk(1, jobs[:2]))
    s.put(_chunk(1, jobs[2:5]))
    s.put(_chunk(1, jobs[5:]))
    assert s.rows[1] == 8
    batch = s.plan(0.0).batch
    assert batch is not None and batch.stage == 1 and len(batch.jobs) == 4  # one full batch from three chunks
    assert s.rows[1] == 4
    assert sum(c.h.shape[0] for c in batch.chunks) == 4


def test_the_deepest_full_stage_runs_before_new_work() -> None:
    s = _scheduler(max_batch=2)
    s.add(_job(0.0))
    s.put(_chunk(2, [_job(0.0), _job(0.0)]))
    s.put(_chunk(1, [_job(0.0)]))
    order = []
    for t in (0.0, 0.01, 0.02):
        batch = s.plan(t).batch
        assert batch is not None
        order.append(batch.stage)
    assert order == [2, 0, 1]  # full stage 3, then new work, then what is left


@pytest.mark.parametrize(("due", "stage"), [(0.018, 1), (0.040, 0)])
def test_a_row_that_would_be_late_after_one_more_run_goes_first(due: float, stage: int) -> None:
    """Stage 2 takes 10 ms; a row due at 18 ms cannot wait for a 10 ms run of new work, one due at 40 ms can."""
    s = _scheduler(max_batch=2)
    s.add(_job(0.0))
    s.add(_job(0.0))
    s.put(_chunk(1, [_job(0.0, due)]))
    batch = s.plan(0.0).batch
    assert batch is not None and batch.stage == stage


def test_admission_predicts_exit_1_from_the_queue_ahead() -> None:
    s = _scheduler(max_batch=2, aging_s=5.0)
    for _ in range(4):
        s.add(_job(0.0, 1.0))
    # Two full stage-1 batches ahead of a job due at 1.0, then its own: 30 ms.
    assert s.exit1_eta(1.0, 0.0) == pytest.approx(0.030)
    # A job due sooner goes before all of them: only its own run.
    assert s.exit1_eta(0.5, 0.0) == pytest.approx(0.010)
    s.busy_until = 0.008
    assert s.exit1_eta(0.5, 0.0) == pytest.approx(0.018)


def test_unreachable_new_jobs_leave_and_late_rows_are_answered_from_their_exit() -> None:
    s = _scheduler(max_batch=4)
    doomed, fine = _job(0.0, 0.005), _job(0.0, 1.0)
    s.add(doomed)
    s.add(fine)
    plan = s.plan(0.0)
    assert plan.unreachable == [doomed]  # exit 1 takes 10 ms, its deadline is at 5 ms
    assert plan.batch is not None and plan.batch.jobs == [fine]
    first, second = _job(0.0, 0.011), _job(0.0, 0.012)
    s.put(_chunk(1, [first]))
    s.put(_chunk(2, [second]))
    plan = s.plan(0.0)  # the earlier deadline runs; after its 10 ms the other cannot finish by 12 ms
    assert plan.batch is not None and plan.batch.jobs == [first]
    assert [j for c in plan.late for j in c.jobs] == [second] and s.queued == 0


def test_a_row_past_an_exit_runs_its_next_stage_only_if_it_ends_before_the_answer_from_that_exit() -> None:
    """The data plane answers a row from the exit it passed at `answer_by`, before its deadline: a stage
    that would end after that is not run, and the row is answered now; exit 1 still counts to the deadline."""
    s = _scheduler(max_batch=4)
    waiting, new = _job(0.0, 0.015), _job(0.0, 0.015)
    waiting.answer_by = new.answer_by = 0.008  # stages take 10 ms
    s.put(_chunk(1, [waiting]))
    s.add(new)
    plan = s.plan(0.0)
    assert [j for c in plan.late for j in c.jobs] == [waiting]  # answered from exit 1 now, not at 8 ms
    assert plan.batch is not None and plan.batch.jobs == [new]  # exit 1 by 10 ms meets its 15 ms deadline
    assert not plan.unreachable


def test_a_slow_spell_cannot_make_the_estimates_refuse_work_for_good() -> None:
    """One stalled run raises an estimate by at most 2x (times the smoothing); a faster run counts in full;
    and a stage left unmeasured for STALE_S (every request refused on its estimate) falls back to the
    warm-up's figure, so the next requests are admitted and measured again."""
    clock = [0.0]
    times = StageTimes(1, clock=lambda: clock[0])
    times.set(0, 1, 0.001)
    times.observe(0, 1, 0.5)  # the thread descheduled for half a second
    assert times.predict(0, 1) == pytest.approx(0.001 * (1 + 0.2))
    for _ in range(30):  # a long slow spell: the estimate follows it
        times.observe(0, 1, 0.05)
    assert times.predict(0, 1) > 0.02
    clock[0] += STALE_S / 2
    assert times.predict(0, 1) > 0.02
    clock[0] += STALE_S
    assert times.predict(0, 1) == pytest.approx(0.001)
    times.observe(0, 1, 0.0005)
    assert times.predict(0, 1) == pytest.approx(0.001 - 0.2 * 0.0005)


def test_the_worker_overhead_estimate_ignores_one_long_pause() -> None:
    s = _scheduler()
    for _ in range(20):
        s.observe_overhead(0.0001)
    s.observe_overhead(0.2)  # a garbage collection in the worker
    assert s.overhead_s < 0.0001 * 1.3


def test_the_answer_margin_learns_how_late_the_timer_fires_within_its_bounds() -> None:
    rng = np.random.default_rng(0)
    margin = AnswerMargin()
    for late in rng.uniform(0.0, 2e-3, 4000):  # the loop wakes 0-2 ms after its timer
        margin.observe(float(late))
    assert 1.85e-3 < margin.estimate_s < 2.1e-3  # about the 99th percentile: 1.98 ms
    for _ in range(1000):  # a stalled loop: held at the cap
        margin.observe(1.0)
    assert margin.estimate_s == pytest.approx(5e-3)
    assert margin.for_budget(4e-3) == pytest.approx(1e-3)  # never more than a quarter of the budget
    assert margin.for_budget(10e-3) == pytest.approx(2.5e-3)
    assert margin.for_budget(200e-3) == pytest.approx(10e-3)  # a long budget keeps 5 % of itself
    for _ in range(10_000):  # an idle loop: back down to the floor
        margin.observe(0.0)
    assert margin.estimate_s == pytest.approx(1e-3)  # the loop's timer resolution
    assert margin.for_budget(10e-3) == pytest.approx(1e-3) and margin.for_budget(60e-3) == pytest.approx(3e-3)


def test_admission_learns_how_much_longer_than_predicted_jobs_wait() -> None:
    """Jobs admitted with a predicted wait of 10 ms that pass exit 1 after 30 ms make admission predict 3x
    (a starved worker); a job dropped unreached counts what it waited; the factor never drops below 1,
    one step raises it at most 2x, and with nothing measured it decays back to 1."""
    s = _scheduler(max_batch=1, aging_s=5.0)
    for _ in range(2):
        s.add(_job(0.0, 1.0))
    assert s.exit1_eta(1.0, 0.0) == pytest.approx(0.030)  # two queued, then its own run: 10 ms each
    for i in range(40):
        now = i * 0.01
        s.slowdown.observe([0.010] * 4, [0.030] * 4, now)
    assert s.slowdown.factor(now) == pytest.approx(3.0, rel=0.02)
    assert s.exit1_eta(1.0, now) - now == pytest.approx(0.090, rel=0.02)
    # A wait predicted shorter than 2 ms counts as 2 ms: the worker's turn on the CPU, not a slowdown.
    fresh = _scheduler().slowdown
    fresh.observe([0.0002], [0.0018], 0.0)
    assert fresh.factor(0.0) == 1.0
    fresh.observe([0.0002], [1.0], 0.0)  # a stalled run: at most 2x per step, smoothed
    assert fresh.factor(0.0) == pytest.approx(1.2)
    assert fresh.wait(0.0002, 0.0) == pytest.approx(0.0002 + 0.2 * 0.002)
    # Nothing admitted for a while: back to the stage times, so admission opens and measures again.
    assert s.slowdown.factor(now + 0.1) == pytest.approx(3.0, rel=0.02)  # held while measured lately
    assert 1.0 < s.slowdown.factor(now + 0.35) < 2.0
    assert s.slowdown.factor(now + 5.0) == pytest.approx(1.0, abs=1e-6)


def test_dropped_and_passed_jobs_teach_the_slowdown() -> None:
    s = _scheduler(max_batch=4)
    doomed, fine = _job(0.0, 0.015), _job(0.0, 1.0)
    s.add(doomed, now=0.0, wait_s=0.010)
    s.add(fine, now=0.0, wait_s=0.010)
    plan = s.plan(0.012)  # the worker got the CPU only now: 12 ms later, the first job cannot make 15 ms
    assert plan.unreachable == [doomed] and plan.batch is not None and plan.batch.jobs == [fine]
    assert s.slowdown.factor(0.012) == pytest.approx(1.0 + 0.2 * (1.2 - 1.0))
    s.waited(plan.batch.jobs, 0.050)  # exit 1 passed 50 ms after admission, 10 ms predicted
    assert s.slowdown.factor(0.050) > 1.2  # 5x, held to 2x the factor in force, smoothed
    untimed = _job(0.0, 1.0)  # added without admission (the in-process path): not measured
    s.add(untimed)
    s.waited([untimed], 10.0)
    assert s.slowdown.factor(10.0) == pytest.approx(1.0, abs=1e-6)


def test_jobs_lost_past_their_deadline_cut_the_in_flight_limit_and_successes_grow_it() -> None:
    """The limit starts at the queue's size; a job that misses exit 1 by its deadline cuts it by a quarter
    once per generation (a burst of losses from jobs admitted before the cut counts once); every job that
    makes it adds 1/limit; it never goes below 1."""
    limit = InflightLimit(100)
    assert limit.value == 100 and allows(limit.value, 99) and not allows(limit.value, 100)
    limit.lost(admitted=0.0, now=0.010)
    limit.lost(admitted=0.005, now=0.011)  # admitted before the cut: the same stall
    assert limit.value == pytest.approx(75)
    for i in range(30):  # every generation loses a job
        limit.lost(admitted=0.011 + i * 0.01, now=0.012 + i * 0.01)
    assert limit.value == 1.0 and allows(limit.value, 0) and not allows(limit.value, 1)
    for _ in range(9):
        limit.passed()
    assert 4.0 < limit.value < 5.0  # +1, +1/2, +1/3, ...: about sqrt(2 n)
    assert allows(limit.value, 3) and not allows(limit.value, 4)


def test_a_job_past_its_answer_time_but_by_its_deadline_leaves_the_in_flight_limit_as_it_is() -> None:
    """Exit 1 passed by the time the answer is due (the deadline less the answer margin) raises the limit;
    passed after that but by the deadline (a near miss) leaves it; after the deadline cuts it."""
    s = _scheduler(max_batch=4)
    s.limit.value = 4.0
    early, near, late = _job(0.0, 0.010), _job(0.0, 0.010), _job(0.0, 0.010)
    for job in (early, near, late):
        job.answer_by = 0.0075  # a 2.5 ms answer margin
        s.add(job, now=0.0, wait_s=0.002)
    s.waited([early], 0.007, ran=True)
    assert s.limit.value == pytest.approx(4.25) and s.in_flight == 2
    s.waited([near], 0.009, ran=True)
    assert s.limit.value == pytest.approx(4.25) and s.in_flight == 1
    s.waited([late], 0.011, ran=True)
    assert s.limit.value == pytest.approx(4.25 * 0.75) and s.in_flight == 0


def test_admission_refuses_at_the_in_flight_limit_but_never_on_an_idle_engine() -> None:
    """Jobs admitted count in flight until stage 1 ran for them or they were dropped; at the limit admission
    refuses at once (503, saying how many wait), and so does a request process's check before decoding, from
    the figures the engine process publishes; dropped jobs cut the limit; an idle engine admits whatever it."""
    s = _scheduler(max_batch=4)
    admission = Admission(s, Brownout(3, 1, enabled=False), 100, lambda _: None)
    s.limit.value = 2.0
    first, second = _job(0.0, 1.0), _job(0.0, 1.0)
    admission.admit(first, 0.0)
    admission.admit(second, 0.0)
    assert s.in_flight == 2
    with pytest.raises(QueueFull, match="2 requests are waiting for exit 1"):
        admission.admit(_job(0.0, 1.0), 0.0)
    board = ForecastBoard.create(max_batch=4, queue_size=100)  # what an engine process publishes
    try:
        board.write(s.forecast(0.0, deep=True))
        published = board.read()
    finally:
        board.close()
    assert published is not None and (published.in_flight, published.limit) == (2, 2.0)
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        precheck_forecast(published, _job(0.0, 1.0).options, 0.0)
    plan = s.plan(2.0)  # the worker came too late: both missed their deadline and leave unreached
    assert plan.unreachable == [first, second] and s.in_flight == 0
    assert s.limit.value == 1.5  # one cut for the generation
    assert s.idle()
    admission.admit(_job(2.0, 1.0), 2.0)  # idle: admitted at a limit of 1.5
    with pytest.raises(QueueFull):
        admission.admit(_job(2.0, 1.0), 2.0)
    plan = s.plan(2.0)
    assert plan.batch is not None
    s.waited(plan.batch.jobs, 2.011, ran=True)  # exit 1 in time
    assert s.in_flight == 0 and s.limit.value == pytest.approx(1.5 + 1 / 1.5)


class _Registry:
    """What `RemoteEngine.submit` hands a job to (the link to the engine process), here nowhere: it keeps
    whether each job went as checked."""

    def __init__(self) -> None:
        self.checked: list[bool] = []

    def submit(self, job: Job, name: str, version: str, checked: bool = False) -> None:
        self.checked.append(checked)


def test_a_request_process_counts_the_requests_it_let_through_until_it_submits_them() -> None:
    """Between two publications of the forecast a request process's check counts the requests it let
    through and has not submitted (their bodies arriving, or decoding) as in flight, with what the engine
    process published after its last admission: the third request against a limit of 2 is refused before
    decoding, not after it at admission. A job it let through goes to the engine process as checked, and
    the engine process admits it as one process admits a checked job (tests/test_engine.py)."""
    s = _scheduler(max_batch=4)
    s.limit.value = 2.0
    board = ForecastBoard.create(max_batch=4, queue_size=100)
    registry = _Registry()
    engine = RemoteEngine(registry, ModelState("m", "1", "/nowhere", "cpu", board.spec), num_exits=3)  # type: ignore[arg-type]
    try:
        board.write(s.forecast(0.0, deep=True))  # nothing in flight
        first, second, third = (InferenceOptions.now(deadline_ms=1000) for _ in range(3))
        engine.precheck(first)
        engine.precheck(second)
        with pytest.raises(QueueFull, match="2 requests are waiting"):
            engine.precheck(third)
        engine.submit(Job(torch.zeros(1), first))  # submitted: admission counts it now, as the engine publishes
        engine.submit(Job(torch.zeros(1), InferenceOptions.now(deadline_ms=1000)))  # never checked
        assert registry.checked == [True, False]
        engine.precheck(third)
        board.set_in_flight(1)  # the engine process admitted `first`
        published = board.read()
        assert published is not None and published.in_flight == 1 and published.limit == 2.0
        with pytest.raises(QueueFull, match="3 requests are waiting"):  # first in flight; second, third decoding
            engine.precheck(InferenceOptions.now(deadline_ms=1000))
    finally:
        engine.close()
        board.close()


def test_a_request_let_through_and_never_submitted_is_forgotten() -> None:
    """A request that failed between the check and its submission (a bad image, a client gone) holds a
    place for `FORGET_S` at most, or until its deadline; releasing says whether there was a hold."""
    holds = Holds()
    now = 100.0
    long = InferenceOptions(received=now, deadline=now + 1.0, client_deadline=True)
    short = InferenceOptions(received=now, deadline=now + 0.01, client_deadline=True)
    holds.add(long, now)
    holds.add(short, now)
    assert holds.count(now) == 2
    assert holds.count(now + 0.02) == 1  # the short one's deadline passed
    assert holds.count(now + Holds.FORGET_S) == 0
    assert not holds.release(long)  # forgotten: its submission is admitted as if unchecked
    holds.add(long, now)
    assert holds.release(long)
    assert not holds.release(short)  # not there: nothing happens
    assert holds.count(now) == 0


def test_a_request_the_check_let_through_holds_its_place_until_admission() -> None:
    """In one process the check before decoding counts the places held by the requests it let through
    and that are still decoding, so a burst's later requests are refused before decoding rather than at
    admission; a request that held a place is admitted though the limit filled or the queue grew while it
    was decoded, and refused then only for what no queue changes (its deadline passed)."""
    s = _scheduler(max_batch=1)
    admission, holds = Admission(s, Brownout(3, 1, enabled=False), 100, lambda _: None), Holds()
    s.limit.value = 2.0
    admission.admit(_job(0.0, 1.0), 0.0)  # one job in flight
    a = _job(0.0, 1.0)
    admission.precheck(a.options, 0.0, holds.count(0.0))
    holds.add(a.options, 0.0)
    with pytest.raises(QueueFull, match="2 requests are waiting"):  # one in flight, `a` decoding
        admission.precheck(_job(0.0, 1.0).options, 0.0, holds.count(0.0))
    admission.admit(_job(0.0, 1.0), 0.0)  # meanwhile, one the check did not see: at the limit now
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        admission.admit(_job(0.0, 1.0), 0.001)  # unchecked: refused
    admission.admit(a, 0.001, checked=holds.release(a.options))  # held its place: admitted all the same
    assert s.in_flight == 3 and a.admitted == 0.001

    s = _scheduler(max_batch=1)  # the queue ahead: three urgent jobs of 10 ms each
    admission = Admission(s, Brownout(3, 1, enabled=False), 100, lambda _: None)
    for _ in range(3):
        admission.admit(_job(0.0, 0.03), 0.0)
    with pytest.raises(QueueFull, match="exit 1 is predicted 40.0 ms from now"):
        admission.admit(_job(0.0, 0.035), 0.0)
    checked = _job(0.0, 0.035)
    holds.add(checked.options, 0.0)
    admission.admit(checked, 0.0, checked=holds.release(checked.options))
    assert s.in_flight == 4
    gone = _job(0.0, 0.035)
    holds.add(gone.options, 0.0)
    with pytest.raises(DeadlineUnreachable, match="deadline passed"):
        admission.admit(gone, 0.04, checked=holds.release(gone.options))
    assert s.in_flight == 4


def _level(job: Job, level: int) -> Job:
    job.options = dataclasses.replace(job.options, priority=level)
    return job


def test_a_higher_priority_goes_first_among_jobs_about_as_urgent() -> None:
    s = Scheduler(3, 1, _scheduler().times, lambda n: n, 0.5, queue_size=100, priority_step_s=0.010)
    low = _level(_job(0.0, 0.100), 2)
    high = _level(_job(0.0, 0.100), 1)
    urgent_low = _level(_job(0.0, 0.080), 2)  # 20 ms sooner: more than one step, so it goes first all the same
    for job in (low, high, urgent_low):
        s.add(job)
    order = [s.plan(t).batch.jobs[0] for t in (0.0, 0.01, 0.02)]
    assert order == [urgent_low, high, low]
    # admission counts the higher level ahead of a new job of the lower one, not behind
    s2 = Scheduler(3, 1, _scheduler().times, lambda n: n, 0.5, queue_size=100, priority_step_s=0.010)
    s2.add(_level(_job(0.0, 0.100), 1))
    assert s2.exit1_eta(s2.priority(_level(_job(0.0, 0.100), 2).options), 0.0) == pytest.approx(0.020)
    assert s2.exit1_eta(s2.priority(_level(_job(0.0, 0.095), 1).options), 0.0) == pytest.approx(0.010)


def test_a_brownout_degrades_the_default_level_and_spares_a_higher_one() -> None:
    s = _scheduler(max_batch=4)
    brownout = Brownout(3, floor=1, enabled=True)
    brownout.level = 1  # new work answers by exit 2 at the latest
    cut: list[Chunk] = []
    admission = Admission(s, brownout, 100, cut.extend, default_priority=2)
    high, default = _level(_job(0.0, 1.0), 1), _level(_job(0.0, 1.0), 2)
    admission.admit(high, 0.0)
    admission.admit(default, 0.0)
    assert high.max_exit is None and default.max_exit == 2
    # rows already past exit 2 when the brownout steps down: the default level's leave, the higher one's stay
    s.waiting[2] = [_chunk(3, [high, default])]
    admission.brownout_changed()
    assert [j for c in cut for j in c.jobs] == [default] and s.waiting[2][0].jobs == [high]
