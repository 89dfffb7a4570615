"""What goes into the engine and what comes out: jobs, answers, the engine's errors, and their sinks.

Every job has one sink, whatever the process model: `LoopSink` completes in-process futures on their
event loop; the engine process's link (service/workers/host.py) sends answers to a request process.
The worker thread calls `settle`, which hands each sink its answers in one call. Runs in whichever
thread calls it (the worker thread, the event loop for the answer at a deadline).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from torch import Tensor

from models.exit_policy import Reason
from service.errors import DEADLINE_EXCEEDED, INFERENCE_FAILED, OVERLOADED, SHUTTING_DOWN, Kind, ServiceError
from service.options import InferenceOptions


class QueueFull(ServiceError):
    """The engine holds as many waiting rows as it may (ANYTIME_QUEUE_SIZE), or cannot make the deadline."""

    kind = OVERLOADED


class DeadlineUnreachable(ServiceError):
    """The deadline passed before an answer could leave (no exit reached, or the answer ready too late)."""

    kind = DEADLINE_EXCEEDED


class EngineFailure(ServiceError):
    """The model failed on the batch that held this job."""

    kind = INFERENCE_FAILED


class EngineStopped(ServiceError):
    """The engine is shutting down and takes no more work."""

    kind = SHUTTING_DOWN


ENGINE_ERRORS: dict[Kind, type[ServiceError]] = {
    e.kind: e for e in (QueueFull, DeadlineUnreachable, EngineFailure, EngineStopped)
}


def engine_error(kind: Kind, message: str, retry_after_s: float | None = None) -> ServiceError:
    """The typed error an engine raised, rebuilt from its kind (on the far side of a process link), so
    that the data plane counts a refusal as a refusal whichever process model it runs in."""
    return ENGINE_ERRORS.get(kind, ServiceError)(message, kind, retry_after_s=retry_after_s)


class Passed(NamedTuple):
    """The last exit a row passed on its way deeper: row `row` of the probabilities `p` of exit `exit` (0-based)."""

    p: Tensor
    row: int
    exit: int
    confidence: float


_seq = itertools.count()


@dataclass(slots=True, eq=False)
class Job:
    """One input waiting for an answer, with its options. `priority` orders it (earliest first)."""

    x: Tensor
    options: InferenceOptions
    priority: float = 0.0
    max_exit: int | None = None  # the options' max_exit, lowered by a brownout
    seq: int = field(default_factory=lambda: next(_seq))
    queued: bool = False  # in stage 1's queue
    shadow: bool = True  # may be shadow-checked for the drift guard (not warm-up traffic)
    started: float | None = None  # when its first stage began
    admitted: float | None = None  # when admission took it, predicting a wait of `predicted_wait_s` for exit 1
    predicted_wait_s: float = 0.0
    answer_by: float | None = None  # when the data plane answers from the exit passed (None: the deadline)
    passed: Passed | None = None  # set by the worker while the job waits for a deeper stage
    # The answer from that exit at its deadline, made by the worker beside the stage for a client's
    # deadline (in a request process: sent by the engine process), so that the event loop only times it.
    fallback: Answer | None = None
    sink: Sink | None = None  # who takes the answer: a LoopSink, or another process's link
    future: asyncio.Future | None = None  # an in-process job's answer (completed by its LoopSink)
    done: bool = False  # set by a sink once it has taken an answer for this job

    @property
    def deadline(self) -> float:
        return self.options.deadline

    @property
    def plan_by(self) -> float:
        """When a row that passed an exit must have its next one: the data plane answers from the exit
        passed then, so a stage that ends later is wasted (or, with a stalled event loop, its answer late)."""
        return self.options.deadline if self.answer_by is None else self.answer_by

    @property
    def settled(self) -> bool:
        """Answered, or no longer waited for (its client went away, or it was answered at its deadline)."""
        if self.future is not None:
            return self.future.done()
        return self.done


@dataclass(slots=True)
class Answer:
    """What the engine found for one job."""

    index: int
    confidence: float
    exit: int  # 1-based
    reason: Reason
    top_k: list[tuple[int, float]]
    queue_s: float
    compute_s: float
    probabilities: list[float] | None = None


Outcome = Answer | BaseException
Deliver = Callable[[list[tuple[Job, Outcome]]], None]


class Sink(Protocol):
    """Takes the answers of jobs, and hears of the exits rows pass on their way deeper."""

    def deliver(self, settled: list[tuple[Job, Outcome]]) -> None: ...

    def passed(self, jobs: list[Job]) -> None:
        """`jobs` passed an exit and go on (`job.passed` says which); called by the worker thread."""


class LoopSink:
    """The sink of in-process jobs: completes their futures on `loop`, one call into it per stage."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def deliver(self, settled: list[tuple[Job, Outcome]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_apply, settled)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def passed(self, jobs: list[Job]) -> None:
        """Nothing to do: the event loop reads `job.passed` itself at the deadline."""


def _apply(settled: list[tuple[Job, Outcome]]) -> None:
    """On the event loop: complete each job's future (unless it is done: answered at its deadline, or
    its client went away)."""
    for job, value in settled:
        future = job.future
        if future is None or future.done():
            continue
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


def settle(settled: list[tuple[Job, Outcome]]) -> None:
    """Hand each sink the answers of its jobs, in one call per sink."""
    for sink, items in _by_sink(settled).values():
        sink.deliver(items)


def announce_passed(jobs: list[Job]) -> None:
    """Tell each sink which of its jobs passed an exit and go on."""
    for sink, items in _by_sink([(j, None) for j in jobs]).values():
        sink.passed([j for j, _ in items])


def _by_sink(items: list[tuple[Job, Any]]) -> dict[int, tuple[Sink, list[tuple[Job, Any]]]]:
    by_sink: dict[int, tuple[Sink, list[tuple[Job, Any]]]] = {}
    for job, value in items:
        if job.sink is not None:
            by_sink.setdefault(id(job.sink), (job.sink, []))[1].append((job, value))
    return by_sink
