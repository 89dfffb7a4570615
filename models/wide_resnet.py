"""Multi-exit Wide ResNets (Zagoruyko & Komodakis 2016), an exit after each of three groups.

WRN-d-k has (d-4)/2 pre-activation basic blocks. Where that number does not split evenly
over the three groups (WRN-20-8: 8 blocks, WRN-44-8: 20), the earlier groups take one block
more, so the stated depth is kept exactly.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from models.multi_exit import MultiExitNet, build_exit_heads, init_weights
from models.registry import register_model
from models.resnet import make_stem


class WideBasic(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3 twice, with dropout between."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        y = self.conv2(self.drop(self.relu(self.bn2(self.conv1(o)))))
        return y + (x if self.shortcut is None else self.shortcut(o))


def build_wide_resnet(
    depth: int,
    widen: int,
    num_classes: int,
    in_channels: int = 3,
    stem: str = "cifar",
    dropout: float = 0.0,
    exit_style: str = "conv",
    attention: bool = False,
) -> MultiExitNet:
    """WRN-`depth`-`widen` with three exits."""
    if depth < 10 or (depth - 4) % 2:
        raise ValueError(f"WideResNet depth must be even and >= 10, got {depth}")
    total = (depth - 4) // 2
    counts = [total // 3 + (1 if i < total % 3 else 0) for i in range(3)]
    widths = [16 * widen, 32 * widen, 64 * widen]
    stages: list[nn.Module] = []
    in_ch = 16
    for g, (w, n) in enumerate(zip(widths, counts, strict=True)):
        blocks: list[nn.Module] = [
            WideBasic(in_ch if i == 0 else w, w, 2 if g and not i else 1, dropout) for i in range(n)
        ]
        if g == 0:
            # CIFAR WRNs start with one plain conv (the blocks are pre-activation).
            first = make_stem(in_channels, 16, stem)
            blocks.insert(0, first[0] if stem == "cifar" else first)
        if g == 2:
            blocks += [nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        stages.append(nn.Sequential(*blocks))
        in_ch = w
    heads = build_exit_heads(widths, [2, 1, 0], num_classes, style=exit_style, attention=attention)
    net = MultiExitNet(stages, heads)
    init_weights(net)
    return net


@register_model
def wrn_16_4(**kwargs: Any) -> MultiExitNet:
    """WRN-16-4 with three exits."""
    return build_wide_resnet(16, 4, **kwargs)


@register_model
def wrn_20_8(**kwargs: Any) -> MultiExitNet:
    """WRN-20-8 with three exits."""
    return build_wide_resnet(20, 8, **kwargs)


@register_model
def wrn_28_10(**kwargs: Any) -> MultiExitNet:
    """WRN-28-10 with three exits."""
    return build_wide_resnet(28, 10, **kwargs)


@register_model
def wrn_44_8(**kwargs: Any) -> MultiExitNet:
    """WRN-44-8 with three exits."""
    return build_wide_resnet(44, 8, **kwargs)
