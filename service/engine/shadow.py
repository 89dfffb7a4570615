"""Shadow checks: early answers run on to the final exit while the worker has nothing else to do.

The engine offers each sample that left an early exit by confidence at the thresholds in force;
a share of them (ANYTIME_SHADOW_RATE) is queued, at most ANYTIME_SHADOW_QUEUE (beyond that they
are dropped and counted). The worker runs one stage of the oldest check at a time, and only when
no request is queued, so a request that arrives waits at most one stage of one sample. The answer
already went to its client; the check only tells the drift guard whether the two labels agree.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from models.multi_exit import MultiExitNet
from service.engine.drift import DriftGuard
from service.metrics import ModelMetrics


@dataclass
class Check:
    """One early answer being re-run: its input, the 0-based exit and label it got, its progress."""

    x: Tensor
    exit: int
    label: int
    h: Tensor | None = None
    stage: int = 0


class ShadowChecks:
    """The queue of checks and the one in progress."""

    def __init__(
        self,
        model: MultiExitNet,
        to_device: Callable[[Tensor], Tensor],
        rate: float,
        capacity: int,
        metrics: ModelMetrics,
        guard: DriftGuard,
        seed: int | None = None,
    ) -> None:
        self.model, self.to_device = model, to_device
        self.rate, self.capacity = rate, capacity
        self.metrics, self.guard = metrics, guard
        self.queue: deque[Check] = deque()
        self.current: Check | None = None
        self._rng = random.Random(seed)

    @property
    def pending(self) -> bool:
        return self.current is not None or bool(self.queue)

    def offer(self, x: Tensor, exit_index: int, label: int) -> None:
        """An early answer (worker thread); kept with probability `rate` while there is room."""
        if self.rate <= 0 or self._rng.random() >= self.rate:
            return
        if len(self.queue) >= self.capacity:
            self.metrics.shadow_dropped()
            return
        self.queue.append(Check(x.clone(), exit_index, label))  # x may live in another process's buffer

    def step(self) -> None:
        """Run one stage of the oldest check; at the final exit, record whether it agreed."""
        check = self.current or self.queue.popleft()
        self.current = check
        with torch.inference_mode():
            h = self.to_device(check.x.unsqueeze(0)) if check.h is None else check.h
            check.h = self.model.run_stage(check.stage, h)
            check.stage += 1
            if check.stage < self.model.num_exits:
                return
            logits, _ = self.model.run_exit(check.stage - 1, check.h)
        self.current = None
        agreed = int(logits.argmax(1)[0]) == check.label
        self.metrics.shadow(check.exit + 1, agreed)
        self.guard.record(check.exit, agreed)
