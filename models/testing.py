"""Registered test networks (like timm's `test_*` models): tiny, and one whose stages take set times.

`test_sleepy` makes deadline behaviour deterministic in tests of the server: each stage sleeps
for the milliseconds given in `stage_ms` (which the artifact's architecture spec carries).
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
def test_sleepy(stage_ms: Sequence[float] = (50, 50, 50, 50), **kwargs: Any) -> MultiExitNet:
    """A 4-exit tiny ResNet whose stage k sleeps `stage_ms[k]` milliseconds (for deadline tests)."""
    if len(stage_ms) != 4:
        raise ValueError(f"test_sleepy needs 4 stage times, got {len(stage_ms)}")
    net = build_resnet(BasicBlock, (1, 1, 1, 1), widths=(4, 8, 8, 8), **kwargs)
    net.stages = nn.ModuleList(nn.Sequential(stage, Sleep(ms)) for stage, ms in zip(net.stages, stage_ms, strict=True))
    return net
