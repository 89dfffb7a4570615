"""Multi-exit PyramidNet (Han et al. 2017) with bottleneck blocks, an exit after each of three groups.

Widths grow additively by alpha / (number of blocks) per block; shortcuts average-pool when
striding and zero-pad the new channels, as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.multi_exit import MultiExitNet, build_exit_heads, init_weights
from models.registry import register_model
from models.resnet import make_stem


class PyramidBottleneck(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN with a padded identity shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.stride = stride
        self.pad = out - in_ch

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        shortcut = F.avg_pool2d(x, 2, ceil_mode=True) if self.stride == 2 else x
        if self.pad:
            zeros = torch.zeros(
                shortcut.shape[0], self.pad, *shortcut.shape[2:], dtype=shortcut.dtype, device=shortcut.device
            )
            shortcut = torch.cat([shortcut, zeros], 1)
        return y + shortcut


def build_pyramidnet(
    depth: int,
    alpha: int,
    num_classes: int,
    in_channels: int = 3,
    stem: str = "cifar",
    exit_style: str = "conv",
    attention: bool = False,
) -> MultiExitNet:
    """PyramidNet-`depth` (bottleneck, depth = 9n + 2) with widening factor `alpha`, three exits."""
    if (depth - 2) % 9:
        raise ValueError(f"Bottleneck PyramidNet depth must be 9n + 2, got {depth}")
    n = (depth - 2) // 9
    step = alpha / (3 * n)
    width = 16.0
    in_ch = 16
    stages: list[nn.Module] = []
    channels: list[int] = []
    for g in range(3):
        blocks: list[nn.Module] = []
        if g == 0:
            blocks.append(make_stem(in_channels, 16, stem))
        for i in range(n):
            width += step
            planes = int(round(width))
            blocks.append(PyramidBottleneck(in_ch, planes, 2 if g and not i else 1))
            in_ch = planes * PyramidBottleneck.expansion
        if g == 2:
            blocks += [nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)]
        stages.append(nn.Sequential(*blocks))
        channels.append(in_ch)
    heads = build_exit_heads(
        channels, [2, 1, 0], num_classes, style=exit_style, attention=attention, reduction=PyramidBottleneck.expansion
    )
    net = MultiExitNet(stages, heads)
    init_weights(net)
    return net


@register_model
def pyramidnet(depth: int = 101, alpha: int = 240, **kwargs: Any) -> MultiExitNet:
    """PyramidNet with bottlenecks; `depth` and `alpha` are arguments (default 101 / 240)."""
    return build_pyramidnet(depth, alpha, **kwargs)


@register_model
def pyramidnet101_240(**kwargs: Any) -> MultiExitNet:
    """PyramidNet-101 with alpha 240, three exits."""
    return build_pyramidnet(101, 240, **kwargs)
