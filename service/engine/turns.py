"""Turns: the worker thread runs one step when the event loop asks for it, and the loop waits for it.

In the server's one process on a CPU, the event loop (reading, deciding, answering) and the worker thread
(stages) share a core and the interpreter. Left to run freely they interleave: every request the loop reads
preempts the stage in progress, a stage takes several times its figure, and work admitted by its prediction
is lost at its deadline, while the loop reads more (receive livelock: Mogul & Ramakrishnan, 1997). Giving
the worker a lower priority, so that the loop refuses first, hands the worker's core to any neighbour on a
shared node instead. So the loop drives the worker: after the callbacks ready now, it hands the worker one
turn (runs of a stage, one after another while they fit `WAIT_S`, or one stage of a shadow check) and waits
for it, up to `WAIT_S`; a run takes no more rows than its stage is predicted to run in that time
(`Scheduler.batch`).

- A step done by then is settled on the loop at once: its requests' tasks wake before the next step, and
  the loop's own work and the stage never compete for the core.
- A longer step (a stage beyond its estimate, the process descheduled by a neighbour) goes on on the worker
  while the loop answers what is due (the answer from an exit at the deadline) and reads and refuses what
  has come; its answers reach the loop through its queue when it ends.

So the loop reads the socket at least every `WAIT_S` whatever a stage costs, and the worker's turn comes once
per turn of the loop whatever the loop reads. Runs on the event loop (`kick`, `_turn`, `_finish`) and on
the worker thread (`_serve`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable

import torch

from service.engine.jobs import Job, Outcome, settle
from service.engine.worker import Worker

log = logging.getLogger("anytime.engine")
WAIT_S = 0.002  # how long the loop waits for a step before it answers, reads and refuses again
FILL_POLL_S = 0.001  # how soon to look again while stage 1 fills a batch (ANYTIME_MAX_WAIT_MS)
IDLE_POLL_S = 0.05  # idle: how often a brownout in force hears the calm (it recovers after a while)


class Turn(enum.Enum):
    """What the worker did with a turn."""

    STEPPED = 1  # ran a stage (or a shadow check's): there may be more
    FILLING = 2  # stage 1 holds rows back to fill a batch
    IDLE = 3  # nothing to do


class Turns:
    """Hands the worker one step at a time from an event loop and settles its answers there."""

    def __init__(self, worker: Worker, on_idle: Callable[[], bool], on_gap: Callable[[float], None], name: str) -> None:
        self.worker = worker
        self.on_idle = on_idle  # on the loop, nothing to do: whether to look again later (a brownout holds)
        self.on_gap = on_gap  # the loop's own time between two steps back to back
        self._stepped: float | None = None  # when the last step ended, if another was asked for at once
        self.runs = 0  # runs in the last turn
        self._lock = threading.Lock()
        self._ask = threading.Event()  # the loop asks for a step
        self._done = threading.Event()  # the step the loop waits for is done
        self._waiting = False  # the loop waits for the step in progress
        self._running = False  # a step is asked for or in progress
        self._settled: list[tuple[Job, Outcome]] = []
        self._result = Turn.IDLE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None  # the next turn, scheduled on the loop
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """After `worker.stop` is set: wake the thread so that it ends, and wait for it."""
        self._ask.set()
        self._thread.join(timeout=timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the event loop ---------------------------------------------------------------------------
    def kick(self, loop: asyncio.AbstractEventLoop, delay_s: float = 0.0) -> None:
        """Schedule a turn on `loop` (one at a time): after the callbacks ready now, or in `delay_s`."""
        if self._handle is not None or self._running or self.worker.stop.is_set():
            return
        self._loop = loop
        if delay_s > 0:
            self._handle = loop.call_later(delay_s, self._turn)
        else:
            self._handle = loop.call_soon(self._turn)

    def _turn(self) -> None:
        self._handle = None
        if self._running or self.worker.stop.is_set():
            return
        if self._stepped is not None:
            self.on_gap((time.monotonic() - self._stepped) / max(self.runs, 1))  # per run of the last turn
            self._stepped = None
        with self._lock:
            self._running = self._waiting = True
            self._done.clear()
        self._ask.set()
        self._done.wait(WAIT_S)
        with self._lock:
            self._waiting = False
            finished = not self._running
        if finished:
            self._finish()
        # else the worker posts `_finish` to the loop when the step ends

    def _finish(self) -> None:
        with self._lock:
            settled, self._settled = self._settled, []
            result = self._result
        settle(settled)  # on the loop's own thread: the futures complete now, before the next turn
        loop = self._loop
        assert loop is not None
        if result is Turn.STEPPED:
            self._stepped = time.monotonic()
            self.kick(loop)
        elif result is Turn.FILLING:
            self.kick(loop, FILL_POLL_S)
        elif self.worker.scheduler.queued:  # admitted while the step found nothing: `submit`'s kick waited
            self.kick(loop)
        elif self.on_idle():
            self.kick(loop, IDLE_POLL_S)

    # -- the worker thread ------------------------------------------------------------------------
    def _collect(self, settled: list[tuple[Job, Outcome]]) -> None:
        with self._lock:
            self._settled.extend(settled)

    def _serve(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            self._ask.wait()
            self._ask.clear()
            if self.worker.stop.is_set():
                return
            result = self._step()
            with self._lock:
                self._result = result
                self._running = False
                post = not self._waiting
                if not post:
                    self._done.set()
            if post and self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._finish)
                except RuntimeError:  # the loop closed: nobody waits any more
                    return

    def _step(self) -> Turn:
        """Steps until the turn's `WAIT_S` would be over by the next (taken as long as the last one): one
        turn of the loop can carry a request through several short stages."""
        try:
            start = time.monotonic()
            runs = 0
            while self.worker.step(self._collect):
                runs += 1
                now = time.monotonic()
                if now + (now - start) / runs > start + WAIT_S or self.worker.stop.is_set():
                    break
            self.runs = runs
            if runs:
                return Turn.STEPPED
            if self.worker.waiting_to_fill():
                return Turn.FILLING
            if self.worker.shadow.pending:
                self.worker.shadow_step()
                return Turn.STEPPED
        except Exception:  # the worker must outlive any bug in one step
            log.exception("engine step failed")
            return Turn.STEPPED
        return Turn.IDLE
