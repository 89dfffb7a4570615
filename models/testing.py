"""Every registered test network (like timm's `test_*` models), so tests run in seconds.

`test_tiny` is a 12 k-parameter 3-exit ResNet. `test_sleepy` makes deadline behaviour
deterministic in tests of the server: each stage sleeps for the milliseconds given in
`stage_ms` (which the artifact's architecture spec carries). `test_faulty` fails on purpose.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from models.multi_exit import MultiExitNet
from models.registry import register_model
from models.resnet import build_resnet


class Sleep(nn.Module):
    """Passes its input through after sleeping `ms` milliseconds."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms = float(ms)

    def forward(self, x: Tensor) -> Tensor:
        time.sleep(self.ms / 1e3)
        return x


@register_model
def test_tiny(**kwargs: Any) -> MultiExitNet:
    """A tiny 3-exit network for tests: a forward pass takes milliseconds."""
    return build_resnet(BasicBlock, (1, 1, 1), widths=(4, 8, 16), **kwargs)


@register_model
def test_sleepy(stage_ms: Sequence[float] = (50, 50, 50, 50), **kwargs: Any) -> MultiExitNet:
    """A 4-exit tiny ResNet whose stage k sleeps `stage_ms[k]` milliseconds (for deadline tests)."""
    if len(stage_ms) != 4:
        raise ValueError(f"test_sleepy needs 4 stage times, got {len(stage_ms)}")
    net = build_resnet(BasicBlock, (1, 1, 1, 1), widths=(4, 8, 8, 8), **kwargs)
    net.stages = nn.ModuleList(nn.Sequential(stage, Sleep(ms)) for stage, ms in zip(net.stages, stage_ms, strict=True))
    return net


class FailOnBright(nn.Module):
    """Raises when any sample's mean exceeds `limit`: lets a test make one batch fail on purpose."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit = float(limit)

    def forward(self, x: Tensor) -> Tensor:
        if bool((x.flatten(1).mean(1) > self.limit).any()):
            raise RuntimeError("test_faulty: a bright image was given")
        return x


@register_model
def test_faulty(fail_above: float = 1.5, **kwargs: Any) -> MultiExitNet:
    """`test_tiny` whose first stage fails on very bright images (for fault-handling tests)."""
    net = test_tiny(**kwargs)
    net.stages[0] = nn.Sequential(FailOnBright(fail_above), net.stages[0])
    return net
