"""What crosses between the request processes and the engine process: messages, links, shared tensors.

A request process writes each decoded input into a slot of its shared-memory arena and sends a small
descriptor (job id, model, version, slot, shape, options) over a Unix socket; the engine process
reads the tensor in place (no copy until the batch is stacked) and sends answers back, one message
per engine stage and request process. Messages are pickled tuples:

    request → engine   ("hello", index, pid, arena name, slot bytes, slots)   ("ready",)
                       ("infer", [(job id, model, version, slot or None, shape, inline bytes, options), ...])
                       ("view", call id, model, version)
    engine → request   ("state", ready, [(model, version, artifact directory), ...], default model)
                       ("answers", [(job id, Answer | None, error kind code, message, retry after), ...])
                       ("view", call id, ModelView as JSON or None, error message)
"""

from __future__ import annotations

import math
import threading
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import torch

from service.errors import TABLE, Kind

KINDS: dict[str, Kind] = {k.code: k for k in TABLE}


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
