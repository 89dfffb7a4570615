"""What goes into the engine and what comes out: jobs, answers, the engine's errors, and settling futures."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from torch import Tensor

from models.exit_policy import Reason
from service.errors import DEADLINE_EXCEEDED, INFERENCE_FAILED, OVERLOADED, SHUTTING_DOWN, ServiceError
from service.options import InferenceOptions


class QueueFull(ServiceError):
    """The engine holds as many waiting rows as it may (ANYTIME_QUEUE_SIZE), or cannot make the deadline."""

    kind = OVERLOADED


class DeadlineUnreachable(ServiceError):
    """The deadline passed before any exit was reached; nothing more will be computed."""

    kind = DEADLINE_EXCEEDED


class EngineFailure(ServiceError):
    """The model failed on the batch that held this job."""

    kind = INFERENCE_FAILED


class EngineStopped(ServiceError):
    """The engine is shutting down and takes no more work."""

    kind = SHUTTING_DOWN


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
    passed: Passed | None = None  # set by the worker while the job waits for a deeper stage
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    sink: Sink | None = None  # instead of a future: who takes the answer (another process's link)
    done: bool = False  # set by a sink once it has taken an answer for this job

    @property
    def deadline(self) -> float:
        return self.options.deadline

    @property
    def settled(self) -> bool:
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
    """Takes the answers of jobs that have no future (service/workers/host.py sends them to a request process)."""

    def deliver(self, settled: list[tuple[Job, Outcome]]) -> None: ...


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
    """From the worker thread: complete futures with one call into each event loop involved, and hand the
    answers of futureless jobs to their sinks, one call per sink."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Outcome]]] = {}
    by_sink: dict[int, tuple[Sink, list[tuple[Job, Outcome]]]] = {}
    for job, value in settled:
        if job.loop is not None:
            by_loop.setdefault(job.loop, []).append((job, value))
        elif job.sink is not None:
            by_sink.setdefault(id(job.sink), (job.sink, []))[1].append((job, value))
    for sink, items in by_sink.values():
        sink.deliver(items)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_apply, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
