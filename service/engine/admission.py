"""Admission: whether the engine takes a request, decided once for the check before decoding and for
admission itself, with the brownout (ANYTIME_OVERLOAD=degrade) stepping down before a refusal.

A request is refused at once (503 `overloaded`, or 504 when its deadline has passed) when the
engine is stopping or full, when its deadline has passed or exit 1 cannot be reached even with
nothing queued, when as many admitted jobs wait for exit 1 as the in-flight limit allows (learnt
from whether they made it, service/engine/limit.py; never on an idle engine), or when the work
queued ahead of it would make it miss exit 1. The check before decoding (`precheck`) makes the
same decision without admitting anything, so that under overload a request is refused before the
server spends time decoding it. A request the check lets through holds a place under the in-flight
limit until it is submitted (`Holds`), and admission in the same process then refuses it only for
what no queue changes.

With several request processes the check before decoding runs in a request process, from the
`Forecast` the engine process publishes after every step (its jobs in flight after every admission
too; service/workers/ipc.py): the same refusals, from figures at most one engine step old, and no
brownout step (admission, in the engine process, still takes it). The request process's holds count
in flight there too (service/workers/remote.py), and a job it let through is sent as checked: the
engine process's admission then refuses it only for what no queue changes, as in one process, since
judging it afresh on the engine's own figures would refuse after decoding what the check let through.

Runs under the engine's lock, on the thread that admits: the event loop in a single process, a
link's reader thread in the engine process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from service.engine.brownout import Brownout
from service.engine.jobs import DeadlineUnreachable, EngineStopped, Job, QueueFull
from service.engine.limit import allows
from service.engine.scheduler import Chunk, Forecast, Scheduler
from service.errors import ServiceError
from service.options import InferenceOptions

log = logging.getLogger("anytime.engine")


def refusal(options: InferenceOptions, now: float, stopping: bool, full: bool, exit1_s: float) -> ServiceError | None:
    """The refusals no queue or brownout can change: the engine stopping or full, a deadline already
    passed, or one exit 1 cannot meet even with nothing queued (None: none of them)."""
    if stopping:
        return EngineStopped("the server is shutting down")
    if full:
        return QueueFull("the server is at capacity; retry shortly")
    if options.deadline <= now:
        return unreached("the deadline passed before the engine", options, exit1_s)
    if now + exit1_s > options.deadline:
        return unreached("exit 1 cannot be reached in time", options, exit1_s)
    return None


def late_for_exit_1(eta: float, deadline: float, now: float, retry_after_s: float) -> QueueFull:
    """The 503 of a request that the queue ahead would make miss exit 1."""
    return QueueFull(
        f"exit 1 is predicted {(eta - now) * 1e3:.1f} ms from now (the queue ahead of this request); "
        f"the deadline is in {(deadline - now) * 1e3:.1f} ms",
        retry_after_s=retry_after_s,
    )


def at_limit(in_flight: int, retry_after_s: float) -> QueueFull:
    """The 503 of a request that finds as many jobs waiting for exit 1 as the in-flight limit allows."""
    return QueueFull(
        f"{in_flight} requests are waiting for exit 1, as many as this server has lately answered in time; "
        "retry shortly",
        retry_after_s=retry_after_s,
    )


def unreached(
    what: str, options: InferenceOptions, exit1_s: float, started: float | None = None
) -> DeadlineUnreachable:
    """A 504 whose sentence says where the budget went (until the first stage `started`, if one did) and
    what exit 1 needs."""
    now = time.monotonic()
    received = options.received
    before = ((started or now) - received) * 1e3
    where = "before its first stage" if started else "before the engine ran it"
    return DeadlineUnreachable(
        f"{what}: of the {options.budget_ms:.1f} ms budget, {before:.1f} ms went {where} "
        f"({(now - received) * 1e3:.1f} ms in all); exit 1 needs about {exit1_s * 1e3:.1f} ms"
    )


class Holds:
    """The requests the check before decoding let through that admission has not seen yet (their body
    still arriving, or decoding). Each holds a place under the in-flight limit for the checks after it,
    until it is submitted, or for `FORGET_S` (one that failed on its way, a bad image or a client gone,
    holds none for long; a later submission is then admitted as if unchecked).

    Checked one after another as a round of reads brings them, the requests of a burst all found the
    same places free, were decoded, and most were then refused at admission after all: decoding that
    under overload took the core from admitted work (docs/server.md, "The check holds a place"). Used
    on the thread that checks: the event loop in one process or a request process."""

    FORGET_S = 0.05

    def __init__(self) -> None:
        self._held: dict[int, tuple[InferenceOptions, float]] = {}  # id -> (the request's options, until)

    def add(self, options: InferenceOptions, now: float) -> None:
        self._held[id(options)] = (options, min(options.deadline, now + self.FORGET_S))

    def release(self, options: InferenceOptions) -> bool:
        """Forget the hold of the request with `options`; whether it had one (the check let it through)."""
        held = self._held.get(id(options))
        if held is None or held[0] is not options:
            return False
        del self._held[id(options)]
        return True

    def count(self, now: float) -> int:
        """How many places are held at `now`."""
        if any(until <= now for _, until in self._held.values()):
            self._held = {key: held for key, held in self._held.items() if held[1] > now}
        return len(self._held)


def precheck_forecast(forecast: Forecast, options: InferenceOptions, now: float, held: int = 0) -> None:
    """The check before decoding from a published forecast: raises what `Admission.precheck` would,
    without a brownout step (`held`: places held by checked requests admission has not seen yet)."""
    error = refusal(options, now, forecast.stopping, forecast.full, forecast.exit1_s)
    if isinstance(error, QueueFull):
        error.retry_after_s = forecast.retry_after_s
    if error is not None:
        raise error
    in_flight = forecast.in_flight + held
    if not allows(forecast.limit, in_flight):
        raise at_limit(in_flight, forecast.retry_after_s)
    if options.client_deadline:
        eta = forecast.exit1_eta(forecast.priority(options), now)
        if eta > options.deadline:
            raise late_for_exit_1(eta, options.deadline, now, forecast.retry_after_s)


class Admission:
    """Decides whether a request is taken (precheck and admit, one decision) and steps the brownout."""

    def __init__(
        self,
        scheduler: Scheduler,
        brownout: Brownout,
        queue_size: int,
        on_brownout: Callable[[list[Chunk]], None],
        default_priority: int = 1,
    ) -> None:
        self.scheduler, self.brownout, self.queue_size = scheduler, brownout, queue_size
        self.on_brownout = on_brownout  # answers the rows a lower limit cut (the engine's)
        self.default_priority = default_priority
        self.stopping = False

    def spared(self, job: Job) -> bool:
        """A job of a higher level than the default: the last a brownout degrades (never, while it holds)."""
        return 0 < job.options.priority < self.default_priority

    def precheck(self, options: InferenceOptions, now: float, held: int = 0) -> None:
        """Refuse now what admission would refuse, admitting nothing, with `held` places held by the
        requests checked before it (`Holds`). While a brownout can still go a level lower, it refuses
        only what would be late even then (the deeper queues cut), after stepping the brownout down as
        admission would."""
        self._decide(options, now, admitting=False, held=held)

    def admit(self, job: Job, now: float, checked: bool = False) -> None:
        """Queue `job` for stage 1, or raise QueueFull (503), DeadlineUnreachable (504), EngineStopped (503).
        A `checked` job held its place since the check before decoding: only what no queue changes
        refuses it (`refusal`), not the in-flight limit or the queue ahead, which it was checked against."""
        job.max_exit = job.options.max_exit
        if self.brownout.enabled and self.brownout.level and not self.spared(job):
            job.max_exit = min(job.max_exit or self.scheduler.num_stages, self.brownout.max_exit)
        wait = self._decide(job.options, now, admitting=True, checked=checked)
        self.scheduler.add(job, now, wait)

    def _decide(
        self, options: InferenceOptions, now: float, admitting: bool, held: int = 0, checked: bool = False
    ) -> float:
        """The one decision; returns the predicted wait for exit 1 (what admission queues the job with)."""
        s, b = self.scheduler, self.brownout
        error = refusal(options, now, self.stopping, s.queued >= self.queue_size, s.exit1_alone())
        if error is not None:
            if isinstance(error, QueueFull):
                error.retry_after_s = s.backlog_s(now)
            raise error
        if not (checked or s.idle() or allows(s.limit.value, s.in_flight + held)):
            raise at_limit(s.in_flight + held, s.backlog_s(now))
        priority = s.priority(options)
        can_degrade = b.enabled and b.max_exit > b.floor
        # Before decoding, rows a brownout could still cut do not count against the request.
        wait, eta = s.exit1_forecast(priority, now, deep=admitting or not can_degrade)
        if not options.client_deadline:
            return wait
        if admitting and b.observe(eta - now, options.deadline - now, now):
            self.brownout_changed()
        if eta > options.deadline and (admitting or can_degrade) and b.refused(now):
            self.brownout_changed()
            if admitting:
                wait, eta = s.exit1_forecast(priority, now)  # the brownout cut the deeper queues
        if eta > options.deadline and not checked:
            raise late_for_exit_1(eta, options.deadline, now, s.backlog_s(now))
        return wait

    def idle(self, now: float) -> None:
        """Nothing queued: the brownout hears a calm moment (it recovers after a while of them)."""
        if self.brownout.enabled and self.brownout.observe(0.0, 1.0, now):
            self.brownout_changed()

    def brownout_changed(self) -> None:
        """The brownout moved: rows queued beyond its new limit are answered from the exit they passed."""
        limit = self.brownout.max_exit
        log.warning("brownout level %d: new work answers by exit %d at the latest", self.brownout.level, limit)
        self.on_brownout(self.scheduler.cut(limit, self.spared))  # stage index k feeds exit k + 1 > limit
