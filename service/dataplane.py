"""The one data plane every protocol calls: readiness, the model lease, metering, the budget, inference.

A protocol adapter (service/protocols/) parses its wire format into bytes or tensors and an
`InferenceOptions` (built here from validated fields and budgets), calls `infer` inside `call`,
and renders the answer or the `ServiceError` it gets. Everything between is written once here:
503 before the models are warm or when an engine is not running, the request's lease on its
model version, its count by protocol and final status, its latency, the deadline's outcome, and
the answer at the deadline when the worker has not given one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import torch

from service.config import ServiceSettings
from service.engine import Answer, DeadlineUnreachable, Job, QueueFull
from service.engine.timing import AnswerMargin
from service.errors import (
    INVALID_OPTION,
    NOT_READY,
    SHUTTING_DOWN,
    Kind,
    ServiceError,
    internal_error,
    to_error,
)
from service.loop_lag import LoopLag
from service.metrics import Metrics
from service.options import InferenceOptions, OptionFields, inference_options
from service.pushback import Pushback
from service.registry import ModelRegistry, freeze_heap

if TYPE_CHECKING:
    from service.workers.remote import RemoteRegistry
from service.served import Served

log = logging.getLogger("anytime.api")
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before the answer


class Lifecycle(IntEnum):
    """Where a serving process is, in order: each state only ever moves to a later one."""

    STARTING = 0  # loading and warming: every request 503
    SERVING = 1  # models and request paths warm: requests answered, /readyz waits for the socket's warm-up
    READY = 2  # /readyz says ready
    DRAINING = 3  # SIGTERM: /readyz 503, requests still answered until the listener closes
    CLOSED = 4  # the listener has closed: new calls refused


@dataclass(frozen=True)
class Protocol:
    """A protocol as the data plane sees it: its metric label and the status it answers each error kind with."""

    name: str
    status: Callable[[Kind], int]


@dataclass(slots=True)
class Phases:
    """One request's moments on the monotonic clock, for its time by phase (`anytime_request_phase_seconds`,
    Triton's inference statistics): read and decoded until the first job goes to the engine, queued until
    the first of its jobs starts, computed until the last answer, then the response."""

    start: float
    submitted: float = math.inf
    started: float = math.inf
    answered: float = 0.0

    def parts(self, end: float) -> tuple[float, float, float, float] | None:
        """compute_input, queue, compute_infer and compute_output seconds; None if nothing was answered."""
        if not self.answered:
            return None
        submitted = min(self.submitted, self.answered)
        started = min(max(self.started, submitted), self.answered)
        return submitted - self.start, started - submitted, self.answered - started, end - self.answered


# The phases of the request this task serves (set by `DataPlane.call`, filled in by `infer`).
_PHASES: ContextVar[Phases | None] = ContextVar("anytime_phases", default=None)


class DataPlane:
    """Shared by every request of every protocol; built once by the app's lifespan."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics, registry: ModelRegistry | RemoteRegistry) -> None:
        self.settings, self.metrics, self.registry = settings, metrics, registry
        self.state = Lifecycle.STARTING
        self.margin = AnswerMargin()  # how early the deadline timer fires, so that its answer leaves in time
        self.lag = LoopLag(report=metrics.loop_lag.set)  # the wait before a request is read (service/loop_lag.py)
        self.pushback = Pushback(
            settings.resend_hold_ms / 1e3, settings.resend_at_once_ms / 1e3, self.lag.current, metrics.resend_holds.inc
        )
        self.refused_at = -math.inf  # when admission last refused a request (precheck or admission)
        worker = registry.worker
        self._worker_requests = metrics.worker_requests.labels(worker) if worker is not None else None

    # -- readiness ---------------------------------------------------------------------------
    def serve(self) -> None:
        """Models and request paths warm: requests are answered (readiness waits for the socket's warm-up)."""
        if self.state is Lifecycle.STARTING:
            self.state = Lifecycle.SERVING

    def become_ready(self) -> None:
        """Warm-up done: readiness turns on (and the engine process hears it, with several request processes)."""
        freeze_heap()
        self.lag.forget()  # the warm-up and the freeze stalled the loop; no request waited for them
        if self.state < Lifecycle.READY:
            self.state = Lifecycle.READY
        self.registry.report_ready()
        log.info("ready: %s", ", ".join(f"{m.name} v{m.version} on {m.device}" for m in self.registry.served()))

    def check_ready(self) -> None:
        """Readiness: 503 while starting or draining. A request process restarted in a ready server is
        ready once it serves: it takes connections from the shared socket already, and its 503 would
        take the whole server out of a balancer while it warms its socket."""
        if self.draining:
            raise ServiceError("the server is shutting down", SHUTTING_DOWN)
        self.check_serving()
        if not (self.state is Lifecycle.READY or self.registry.server_ready):
            raise ServiceError("the server is warming up its listening socket", NOT_READY)

    def check_serving(self) -> None:
        """503 until the models are warm. Requests are answered from then on, before readiness: the
        listening socket is shared, so a restarted request process takes connections while it warms
        its socket. A draining server still answers what reaches it: only readiness turns 503, so
        balancers stop sending before the listener closes (service/drain.py)."""
        if _warming():
            return
        if self.state is Lifecycle.CLOSED:
            raise ServiceError("the server is shutting down", SHUTTING_DOWN)
        if self.state is Lifecycle.STARTING:
            raise ServiceError("the models are not loaded and warmed up yet", NOT_READY)
        if not self.registry.available:
            raise ServiceError("the engine process is not ready (starting or restarting)", NOT_READY)

    @property
    def draining(self) -> bool:
        """SIGTERM came: /readyz answers 503 (requests are still answered until the listener closes)."""
        return self.state >= Lifecycle.DRAINING

    def drain(self) -> None:
        if self.state < Lifecycle.DRAINING:
            self.state = Lifecycle.DRAINING

    def close(self) -> None:
        """The HTTP listener has closed (service/drain.py): new calls are refused."""
        self.state = Lifecycle.CLOSED

    def model(self, name: str | None = None, version: str | None = None) -> Served:
        """A served model for a metadata request (404 if not served; 503 while starting or draining)."""
        self.check_ready()
        return self.registry.get(name, version)

    # -- one inference request ---------------------------------------------------------------
    @asynccontextmanager
    async def call(
        self, protocol: Protocol, name: str | None = None, version: str | None = None
    ) -> AsyncIterator[Served]:
        """The model a request is served by, held until the request ends; every request is counted by
        `protocol` and its final status and timed, and every failure comes out as a ServiceError."""
        start = time.monotonic()
        served: Served | None = None
        status = 500
        phases = Phases(start)
        token = _PHASES.set(phases)
        try:
            self.check_serving()
            async with self.registry.lease(name, version) as model:
                if not model.engine.alive:
                    raise ServiceError(f"model {model.name} is not running", NOT_READY)
                served = model
                yield model
            status = 200
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client hung up: not a server error
            raise
        except Exception as exc:
            error = to_error(exc)
            if error is None:
                log.exception("unhandled error")
                error = internal_error()
            status = protocol.status(error.kind)
            raise error from None
        finally:
            _PHASES.reset(token)
            if not _warming():
                self._meter(protocol, served, status, phases, time.monotonic())

    def meter_refusal(self, protocol: Protocol, served: Served, status: int, start: float) -> None:
        """Count a refusal that never reached `call` (service/protocols/early.py) as `call` counts one."""
        self._meter(protocol, served, status, Phases(start), time.monotonic())

    def _meter(self, protocol: Protocol, served: Served | None, status: int, phases: Phases, end: float) -> None:
        seconds = end - phases.start
        if self._worker_requests is not None:
            self._worker_requests.inc()
        if served is not None:
            served.metrics.request(protocol.name, status)
            served.metrics.request_latency.observe(seconds)
            ok = status == 200
            served.metrics.phases(ok, seconds, phases.parts(end) if ok else None)
        else:
            self.metrics.requests.labels("", "", protocol.name, str(status)).inc()
            self.metrics.request_latency.labels("", "").observe(seconds)

    def options(
        self, received: float, fields: OptionFields, budgets: Sequence[float | None] = (), probabilities: bool = False
    ) -> InferenceOptions:
        """The request's options: its fields, and its deadline by the one budget rule (service/options.py)."""
        s = self.settings
        return inference_options(
            received - self.lag.current(),  # it arrived before the loop could read it
            fields,
            budgets,
            s.default_deadline_ms,
            s.request_timeout_s,
            probabilities=probabilities,
            priority_levels=s.priority_levels,
            default_priority=s.default_priority,
        )

    async def _answer(self, model: Served, job: Job, future: asyncio.Future[Answer]) -> Answer:
        """The worker's answer, or the answer from the exit the row passed when the deadline comes: the
        one mechanism for both process models (with several, the engine process reports the exits
        passed, and the request process answers from them).

        A timer set for the deadline itself fires after it, and later still when the loop is busy,
        so the loop stops waiting an answer margin early (`AnswerMargin`) when the row has passed an
        exit to answer from; a row that has passed none is waited for until the deadline itself. The
        worker plans a row's deeper stages to that earlier time (`Job.answer_by`, set in `infer`): a
        stage that would end after it is wasted, and on a stalled core its answer late."""
        engine = model.engine
        end, due = job.deadline, job.plan_by
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=max(0.0, due - time.monotonic()))
                if done:
                    return future.result()
                if due >= end or engine.passed(job):
                    break
                due = end  # nothing to answer from yet: wait for exit 1 until the deadline
            try:
                return engine.answer_now(job)
            finally:
                self.margin.observe(time.monotonic() - due)
        finally:
            future.cancel()  # answered at the deadline, or the client went away: the worker drops the row

    def precheck(self, model: Served, options: InferenceOptions) -> None:
        """Refuse before decoding what the engine would refuse anyway (counted like a refusal at admission)."""
        try:
            model.engine.precheck(options)
        except (DeadlineUnreachable, QueueFull):
            self._rejected(model, options)
            raise

    def _rejected(self, model: Served, options: InferenceOptions) -> None:
        """Admission refused a request (before decoding or at admission): when, and its deadline's outcome."""
        self.refused_at = time.monotonic()
        if options.client_deadline and not _warming():
            model.metrics.deadline("rejected")

    async def infer(self, model: Served, x: torch.Tensor, options: InferenceOptions) -> Answer:
        """Run one input through `model`'s engine and record its exit, latency and deadline outcome.

        The worker answers by the deadline from the deepest exit it reached; if it has not when the
        deadline comes (a stage ran longer than predicted), the answer comes from the exit the row
        passed last, or 504 when it passed none. An answer ready only after a client's deadline is a
        504 too (`late_answer`): no 200 leaves after its deadline."""
        if options.max_exit is not None and options.max_exit > model.num_exits:
            raise ServiceError(f"max_exit: the model has {model.num_exits} exits", INVALID_OPTION)
        job = Job(x, options, shadow=not _warming())
        if options.client_deadline:
            job.answer_by = options.deadline - self.margin.for_budget(options.deadline - options.received)
        metrics = model.metrics
        phases = _PHASES.get()
        if phases is not None:
            phases.submitted = min(phases.submitted, time.monotonic())
        try:
            answer = await self._answer(model, job, model.engine.submit(job))
        except (DeadlineUnreachable, QueueFull):
            self._rejected(model, options)
            raise
        now = time.monotonic()
        if options.client_deadline and now > options.deadline:
            if not _warming():
                metrics.deadline("missed")
            raise late_answer(answer, options, now)
        if phases is not None:
            phases.started = min(phases.started, options.received + answer.queue_s)
            phases.answered = max(phases.answered, now)
        if not _warming():
            metrics.answered(answer.exit, answer.reason.value, now - options.received)
            if options.client_deadline:
                metrics.deadline("met")
        return answer


def late_answer(answer: Answer, options: InferenceOptions, now: float) -> DeadlineUnreachable:
    """The 504 of an answer that was ready only after the client's deadline (a stalled or overloaded
    loop): a deadline-aware client has stopped waiting for it, so it does not leave as a 200."""
    return DeadlineUnreachable(
        f"the answer (exit {answer.exit}) was ready {(now - options.deadline) * 1e3:.1f} ms after the deadline "
        f"({(now - options.received) * 1e3:.1f} ms of a {options.budget_ms:.1f} ms budget); it is not sent late"
    )


_WARMUP: ContextVar[bool] = ContextVar("anytime_warmup", default=False)
WARMUP_HEADER = "x-anytime-warmup"
# One token per server (its request processes share the supervisor's): only its own warm-up carries it.
WARMUP_TOKEN = os.environ.get("ANYTIME_INTERNAL_WARMUP_TOKEN") or secrets.token_hex(16)


def _warming() -> bool:
    return _WARMUP.get()


@asynccontextmanager
async def warming_up() -> AsyncIterator[None]:
    """Requests made inside (in this task and the tasks it starts) are served before readiness and not
    counted: the request-path warm-up."""
    token = _WARMUP.set(True)
    try:
        yield
    finally:
        _WARMUP.reset(token)
