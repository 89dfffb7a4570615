"""The multi-exit network contract shared by training and serving.

A `MultiExitNet` is a sequence of stages (the stem is folded into stage 0) and one exit
head per stage; the last head is the network's own classifier. Training calls `forward`
and gets every exit's logits and hint features in one pass; serving calls `run_stage` and
`run_exit` one stage at a time (or `iter_exits`) and stops whenever it likes. Both paths use
the same modules, so in eval mode they give identical logits.

Exit heads follow *Be Your Own Teacher* (Zhang et al., ICCV 2019): a bottleneck of stride-2
convolutions brings a stage's feature map to the deepest stage's channels and resolution, so
the L2 feature hint compares like with like; then global average pooling and a linear layer.

Two head styles are offered:

* ``"conv"`` (default): each stride-2 step is a 3x3 conv + BN + ReLU, as in the ICCV paper
  (for bottleneck networks, whose stages are 4x wider than their convolutions, a
  1x1 → 3x3/2 → 1x1 bottleneck at a quarter of the width, like the blocks it stands in for).
  Before the convolutions the head average-pools the stage's map while it is still more than
  four times the deepest stage's resolution (at most two halvings are left to the convs):
  a 3x3 conv at full resolution made exit 1 nearly as costly as the whole network on
  28x28 inputs (DESIGN.md, "Exits must be cheap"), and pooling first keeps the head a small
  fraction of the stages it lets a request skip.
* ``"sepconv"``: the TPAMI reference code's depthwise-separable convolutions (each step is
  dw3x3/s2 → 1x1 → dw3x3 → 1x1 with BN and ReLU), optionally preceded by its attention gate
  (``attention=True``: sepconv/s2, BN, ReLU, bilinear upsample ×2, sigmoid, multiplied in).
  Fewer parameters, more layers; useful for the large CIFAR/ImageNet networks.
* ``"light"``: for exits after single blocks early in the network, where a head must cost a
  small share of the few blocks before it: average pooling straight to twice the deepest
  resolution, then one 3x3/2 conv + BN + ReLU to the deepest width (a 1x1 conv when the exit
  already sits at the deepest resolution). On `resnet_fmnist` the "conv" head after the first
  block costs 3.3 MFLOPs (6 % of the network, half the block before it), the light one 0.6.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class MultiExitOutput:
    """Every exit's logits and the pooled features the feature-hint loss compares."""

    logits: list[Tensor]
    features: list[Tensor]


class SepConv(nn.Module):
    """Depthwise-separable conv pair from the BYOT reference code (TPAMI version)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, in_ch, 1, bias=False),
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, in_ch, 3, 1, 1, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class AttentionGate(nn.Module):
    """Soft spatial attention of the BYOT reference code: x * sigmoid(up(sepconv(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            SepConv(channels, channels, stride=2),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        gate = self.body(x)
        if gate.shape[-2:] != x.shape[-2:]:  # odd sizes: upsampling overshoots by one
            gate = gate[..., : x.shape[-2], : x.shape[-1]]
        return x * gate


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(True)]


def _conv_step(in_ch: int, out_ch: int, reduction: int = 1) -> nn.Module:
    """A stride-2 step: one 3x3 conv, or 1x1 → 3x3/2 → 1x1 at `out_ch / reduction` for wide networks."""
    if reduction == 1:
        return nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 3, 2))
    mid = max(1, out_ch // reduction)
    return nn.Sequential(*_conv_bn_relu(in_ch, mid, 1), *_conv_bn_relu(mid, mid, 3, 2), *_conv_bn_relu(mid, out_ch, 1))


EXIT_STYLES = ("conv", "sepconv", "light")


class ExitHead(nn.Module):
    """Bottleneck to the deepest stage's shape, global average pool, linear classifier."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        style: str = "conv",
        attention: bool = False,
        pre_pool: int = 1,
        reduction: int = 1,
        pointwise: bool = False,
    ) -> None:
        """`channels` lists the stage's width, then the width after each stride-2 step (`pointwise`: one
        1x1 step at the same resolution, for an exit already at the deepest resolution)."""
        super().__init__()
        if style not in EXIT_STYLES:
            raise ValueError(f"Unknown exit style {style!r}; use one of {', '.join(EXIT_STYLES)}")
        layers: list[nn.Module] = []
        if attention:
            layers.append(AttentionGate(channels[0]))
        if pre_pool > 1:
            layers.append(nn.AvgPool2d(pre_pool, ceil_mode=True))
        for a, b in zip(channels[:-1], channels[1:], strict=True):
            if pointwise:
                layers.append(nn.Sequential(*_conv_bn_relu(a, b, 1)))
            elif style == "conv":
                layers.append(_conv_step(a, b, reduction))
            elif style == "sepconv":
                layers.append(SepConv(a, b))
            else:
                layers.append(nn.Sequential(*_conv_bn_relu(a, b, 3, 2)))
        self.bottleneck = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        feature = torch.flatten(self.pool(self.bottleneck(h)), 1)
        return self.fc(feature), feature


class FinalHead(nn.Module):
    """The network's own classifier: global average pool and linear (torchvision style)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        feature = torch.flatten(self.pool(h), 1)
        return self.fc(feature), feature


def build_exit_heads(
    stage_channels: Sequence[int],
    downsamples: Sequence[int],
    num_classes: int,
    *,
    final_head: nn.Module | None = None,
    style: str = "conv",
    attention: bool = False,
    reduction: int = 1,
) -> nn.ModuleList:
    """One head per stage. `downsamples[k]` is how many halvings lie between stage k and the last.

    `reduction` > 1 (bottleneck networks, whose stages are 4x wider than their convolutions)
    makes each "conv" step a 1x1 → 3x3/2 → 1x1 bottleneck, so that a head stays cheap next to
    the stages it skips.

    The bottleneck of exit k mirrors the widths of the stages it stands in for, ending at the
    deepest stage's width. In the "conv" style, halvings beyond two are done by average pooling
    before the convolutions (see the module docstring).
    """
    heads: list[nn.Module] = []
    last = len(stage_channels) - 1
    for k, steps in enumerate(downsamples[:-1]):
        if steps < 1:
            raise ValueError(f"stage {k} is already at the deepest resolution; an exit needs a halving")
        later = list(stage_channels[k + 1 :])
        heads.append(exit_head(stage_channels[k], later, steps, num_classes, style, attention, reduction))
    heads.append(final_head or FinalHead(stage_channels[last], num_classes))
    return nn.ModuleList(heads)


def exit_head(
    width: int,
    later: Sequence[int],
    steps: int,
    num_classes: int,
    style: str = "conv",
    attention: bool = False,
    reduction: int = 1,
) -> ExitHead:
    """The head of an exit on a map `width` channels wide and `steps` halvings above the deepest one; `later`
    lists the widths after it (the last is the deepest width, which every head ends at)."""
    deepest = later[-1] if later else width
    if steps == 0:
        widths = [width] if width == deepest else [width, deepest]
        return ExitHead(widths, num_classes, style=style, attention=attention, pointwise=True)
    if style == "light":
        return ExitHead([width, deepest], num_classes, style=style, attention=attention, pre_pool=2 ** (steps - 1))
    # Spread the later widths over the halvings; the last always hits the deepest width.
    widths = [width, *(later[min(len(later), math.ceil((i + 1) * len(later) / steps)) - 1] for i in range(steps))]
    pre_pool = 1
    if style == "conv" and steps > 2:
        pre_pool = 2 ** (steps - 2)
        widths = [widths[0], *widths[-2:]]
    return ExitHead(widths, num_classes, style=style, attention=attention, pre_pool=pre_pool, reduction=reduction)


def init_weights(net: nn.Module) -> None:
    """torchvision's initialisation, used by every family: Kaiming-normal (fan-out) convolutions
    with zero bias, batch norms at weight 1 and bias 0; linear layers keep PyTorch's default."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MultiExitNet(nn.Module):
    """A network of stages with an exit head after each; see the module docstring."""

    def __init__(self, stages: Sequence[nn.Module], exits: nn.ModuleList) -> None:
        super().__init__()
        if len(stages) != len(exits):
            raise ValueError(f"{len(stages)} stages but {len(exits)} exit heads")
        self.stages = nn.ModuleList(stages)
        self.exits = exits
        # Families built from residual blocks say where each block and the stem live, and after which
        # 1-based block each exit sits (models/exit_points.py keeps a subset of exits with them).
        self.exit_blocks: list[int] | None = None
        self.block_paths: list[str] | None = None
        self.layer_sizes: list[int] | None = None
        self.stem_path: str | None = None

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def run_stage(self, k: int, h: Tensor) -> Tensor:
        """Run stage `k` (0-based; stage 0 includes the stem) on the previous stage's output."""
        return self.stages[k](h)

    def run_exit(self, k: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """Exit `k`'s logits and hint feature from stage `k`'s output."""
        return self.exits[k](h)

    def iter_exits(self, x: Tensor, max_exit: int | None = None) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield `(k, logits_k, h_k)` stage by stage; nothing past the yielded exit is computed."""
        h = x
        stop = self.num_exits if max_exit is None else min(max_exit, self.num_exits)
        for k in range(stop):
            h = self.run_stage(k, h)
            logits, _ = self.run_exit(k, h)
            yield k, logits, h

    def forward(self, x: Tensor) -> MultiExitOutput:
        logits: list[Tensor] = []
        features: list[Tensor] = []
        h = x
        for k in range(self.num_exits):
            h = self.run_stage(k, h)
            z, f = self.run_exit(k, h)
            logits.append(z)
            features.append(f)
        return MultiExitOutput(logits, features)
