"""What crosses between the request processes and the engine process: messages, links, shared memory.

A request process writes each decoded input into a slot of its shared-memory arena and sends a small
`JobRecord` over a Unix socket; the engine process reads the tensor in place (no copy until the batch
is stacked) and sends `Outcome`s back, one message per engine stage and request process, and, for
jobs with a deadline, the answer of each exit they pass on their way deeper (`Passed`), so that the
request process answers at the deadline itself. Each model's `ForecastBoard` carries what the
check before decoding needs, written by the engine process after every worker step. Messages are
pickled tuples:

    request → engine   ("hello", index, pid, arena name, slot bytes)   ("ready",)
                       ("infer", [JobRecord, ...])
                       ("view", call id, model, version)   ("released", model, version)
                       ("control", call id, "index" | "load" | "unload", model)
    engine → request   ("state", ready, [ModelState, ...], default model)
                       ("answers", [Outcome, ...])   ("passed", [Passed, ...])
                       ("view", call id, ModelView as JSON or None, error message)
                       ("control", call id, result, error code or None, error message)

Runs in both kinds of process: links are used by the event loop (sending) and reader threads.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from service.engine.jobs import Answer
from service.engine.scheduler import Forecast
from service.engine.timing import Slowdown
from service.errors import TABLE, Kind
from service.options import InferenceOptions

KINDS: dict[str, Kind] = {k.code: k for k in TABLE}


@dataclass(slots=True)
class JobRecord:
    """One job from a request process: its input (a slot of the sender's arena, or inline bytes) and options."""

    id: int
    model: str
    version: str
    slot: int | None
    shape: tuple[int, ...]
    inline: bytes | None
    options: InferenceOptions
    shadow: bool  # may be shadow-checked for the drift guard (warm-up traffic is not)
    answer_by: float | None  # when the request process answers from the exit passed (`Job.answer_by`)
    checked: bool = False  # the sender's check before decoding let it through and held its place (`Holds`)


@dataclass(slots=True)
class Outcome:
    """A job's answer, or its error as the error table's code (rebuilt into the typed error on arrival)."""

    id: int
    answer: Answer | None
    code: str | None = None
    message: str | None = None
    retry_after_s: float | None = None


@dataclass(slots=True)
class Passed:
    """The answer a job would get from the exit it just passed (reason `deadline`)."""

    id: int
    answer: Answer


@dataclass(slots=True)
class ModelState:
    """A model the engine process serves: where its artifact is and which board holds its forecast."""

    name: str
    version: str
    path: str
    device: str
    board: str | None


class ForecastBoard:
    """One model's `Forecast` in shared memory: the engine process writes it after every worker step,
    request processes read it before decoding. A sequence number, odd while a write is under way,
    tells a reader to read again."""

    # seq, stopping, full, retry after, exit 1, busy until, deep, full batch, aging, step, factor, seen,
    # in flight, limit, n
    _HEAD = 15
    _IN_FLIGHT = 12  # where the jobs in flight are

    def __init__(self, shm: SharedMemory, max_batch: int, queue_size: int, owner: bool) -> None:
        self.shm, self.max_batch, self.queue_size, self.owner = shm, max_batch, queue_size, owner
        self._a = np.ndarray((self._HEAD + max_batch + queue_size,), dtype=np.float64, buffer=shm.buf)

    @classmethod
    def create(cls, max_batch: int, queue_size: int) -> ForecastBoard:
        shm = SharedMemory(create=True, size=8 * (cls._HEAD + max_batch + queue_size))
        board = cls(shm, max_batch, queue_size, owner=True)
        board._a[:] = 0.0
        return board

    @classmethod
    def attach(cls, name: str) -> ForecastBoard:
        """A request process's view; the sizes are in the name (`create`'s board.spec)."""
        shm_name, max_batch, queue_size = name.rsplit(":", 2)
        return cls(SharedMemory(name=shm_name), int(max_batch), int(queue_size), owner=False)

    @property
    def spec(self) -> str:
        return f"{self.shm.name}:{self.max_batch}:{self.queue_size}"

    def write(self, f: Forecast) -> None:
        """Under the engine's lock (one writer)."""
        a, h, b = self._a, self._HEAD, self.max_batch
        n = min(len(f.priorities), self.queue_size)
        a[0] += 1
        a[1:h] = (f.stopping, f.full, f.retry_after_s, f.exit1_s, f.busy_until, f.deep_s, f.full_batch_s,
                  f.aging_s, f.priority_step_s, *f.slowdown.state, f.in_flight, f.limit, n)  # fmt: skip
        a[h : h + b] = f.batch_cost_s[:b]
        a[h + b : h + b + n] = f.priorities[:n]
        a[0] += 1

    def set_in_flight(self, in_flight: int) -> None:
        """The jobs in flight after an admission, between two forecasts (under the engine's lock, as `write`):
        request processes count them against the limit at once rather than after the next worker step."""
        a = self._a
        a[0] += 1
        a[self._IN_FLIGHT] = in_flight
        a[0] += 1

    def read(self) -> Forecast | None:
        """The latest forecast (None before the first write, or if every read raced a write)."""
        a, h, b = self._a, self._HEAD, self.max_batch
        for _ in range(4):
            seq = a[0]
            if seq == 0 or seq % 2:
                continue
            head = a[1:h].copy()
            n = int(head[13])
            costs, priorities = a[h : h + b].copy(), a[h + b : h + b + n].copy()
            if a[0] != seq:
                continue
            slowdown = Slowdown.restored((float(head[9]), float(head[10])))
            return Forecast(
                stopping=bool(head[0]),
                full=bool(head[1]),
                retry_after_s=float(head[2]),
                exit1_s=float(head[3]),
                busy_until=float(head[4]),
                deep_s=float(head[5]),
                batch_cost_s=costs,
                full_batch_s=float(head[6]),
                priorities=priorities,
                aging_s=float(head[7]),
                priority_step_s=float(head[8]),
                slowdown=slowdown,
                in_flight=int(head[11]),
                limit=float(head[12]),
            )
        return None

    def close(self) -> None:
        del self._a
        try:
            self.shm.close()
        except BufferError:
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


class Link:
    """One end of the socket between a request process and the engine process; sends are serialised
    (several threads answer on it), receives belong to one reader."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.closed = False

    def send(self, message: tuple[Any, ...]) -> bool:
        """Send one message; False once the other end is gone."""
        if self.closed:
            return False
        try:
            with self._lock:
                self.conn.send(message)
            return True
        except (OSError, ValueError, EOFError):
            self.closed = True
            return False

    def recv(self) -> tuple[Any, ...] | None:
        """The next message; None once the other end is gone."""
        try:
            return self.conn.recv()
        except (OSError, EOFError, ValueError):
            self.closed = True
            return None

    def close(self) -> None:
        self.closed = True
        try:
            self.conn.close()
        except OSError:
            pass


class Arena:
    """A request process's shared memory: `slots` float32 slots of `slot_bytes` each, handed out and back."""

    def __init__(self, slot_bytes: int, slots: int) -> None:
        self.slot_bytes = max(4, slot_bytes - slot_bytes % 4)
        self.slots = slots
        self.shm = SharedMemory(create=True, size=self.slot_bytes * slots)
        self._free: deque[int] = deque(range(slots))
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.shm.name

    def put(self, x: torch.Tensor) -> int | None:
        """Copy `x` (float32) into a free slot and return its number; None when none is free or `x` is too big."""
        if x.numel() * 4 > self.slot_bytes:
            return None
        with self._lock:
            if not self._free:
                return None
            slot = self._free.popleft()
        view = torch.frombuffer(self.shm.buf, dtype=torch.float32, count=x.numel(), offset=slot * self.slot_bytes)
        view.copy_(x.reshape(-1))
        return slot

    def free(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def close(self) -> None:
        try:
            self.shm.close()
        except BufferError:  # a tensor still views it; the memory goes with the process
            pass
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


class ArenaView:
    """The engine process's view of a request process's arena."""

    def __init__(self, name: str, slot_bytes: int) -> None:
        # Attaching registers the segment with the resource tracker too (before Python 3.13); every process
        # of the server shares the supervisor's tracker, so that is the owner's entry, removed at its unlink.
        self.shm = SharedMemory(name=name)
        self.slot_bytes = slot_bytes

    def tensor(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The input in `slot`, in place (valid until the request process frees the slot at its answer)."""
        count = math.prod(shape)
        return torch.frombuffer(self.shm.buf, dtype=torch.float32, count=count, offset=slot * self.slot_bytes).view(
            shape
        )

    def close(self) -> None:
        try:
            self.shm.close()
        except BufferError:
            pass
