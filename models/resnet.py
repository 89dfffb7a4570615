"""Multi-exit ResNets (He et al. 2016) with BYOT exits after each of the four stages.

The residual blocks are torchvision's own, so the deepest path with the ImageNet stem and
1000 classes has exactly torchvision's parameter count.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from models.multi_exit import FinalHead, MultiExitNet, exit_head, init_weights
from models.registry import register_model

Block = type[BasicBlock] | type[Bottleneck]


def make_stem(in_channels: int, width: int, stem: str) -> nn.Sequential:
    """CIFAR stem: 3x3 conv, no pooling. ImageNet stem: 7x7/2 conv and 3x3/2 max-pool."""
    if stem == "cifar":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )


def make_layer(block: Block, inplanes: int, planes: int, blocks: int, stride: int, **block_kw: Any) -> nn.Sequential:
    """A stage of `blocks` residual blocks; the first one changes stride and width."""
    downsample = None
    out = planes * block.expansion
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, stride, downsample, **block_kw)]
    layers += [block(out, planes, **block_kw) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def build_resnet(
    block: Block,
    layers: Sequence[int],
    num_classes: int,
    in_channels: int = 3,
    stem: str = "cifar",
    widths: Sequence[int] = (64, 128, 256, 512),
    exit_style: str = "conv",
    attention: bool = False,
    exits: Sequence[int] | None = None,
    **block_kw: Any,
) -> MultiExitNet:
    """A ResNet-style multi-exit network: stem, one layer per entry of `layers`, and an exit after each
    layer, or after each residual block that `exits` names (1-based over all blocks; the last block
    always has the final exit). A stage is then the blocks between two exits."""
    blocks: list[nn.Module] = []
    layer_of: list[int] = []  # the layer (0-based) each block belongs to
    channels: list[int] = []  # each layer's output width
    inplanes = widths[0]
    for i, (planes, count) in enumerate(zip(widths, layers, strict=True)):
        layer = make_layer(block, inplanes, planes, count, 1 if i == 0 else 2, **block_kw)
        inplanes = planes * block.expansion
        channels.append(inplanes)
        blocks += list(layer)
        layer_of += [i] * count
    ends = list(itertools.accumulate(layers))
    exits = _check_exits(exits, len(blocks)) or ends
    stem_module = make_stem(in_channels, widths[0], stem)
    if exits == ends:  # one exit per layer: the layout every artifact before exits-at-any-block has
        stages = [nn.Sequential(*blocks[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        stages[0] = nn.Sequential(stem_module, stages[0])
        starts = [0, *ends]
        block_paths = [
            f"stages.{layer_of[g]}.{'1.' if layer_of[g] == 0 else ''}{g - starts[layer_of[g]]}"
            for g in range(len(blocks))
        ]
        stem_path = "stages.0.0"
    else:
        stages = [nn.Sequential(*blocks[a:b]) for a, b in zip([0, *exits[:-1]], exits, strict=True)]
        stages[0] = nn.Sequential(stem_module, *stages[0])
        block_paths = []
        for k, (a, b) in enumerate(zip([0, *exits[:-1]], exits, strict=True)):
            block_paths += [f"stages.{k}.{g - a + (1 if k == 0 else 0)}" for g in range(a, b)]
        stem_path = "stages.0.0"
    n = len(layers)
    heads: list[nn.Module] = []
    for e in exits[:-1]:
        layer = layer_of[e - 1]
        later, steps = channels[layer + 1 :], n - 1 - layer
        heads.append(exit_head(channels[layer], later, steps, num_classes, exit_style, attention, block.expansion))
    heads.append(FinalHead(channels[-1], num_classes))
    net = MultiExitNet(stages, nn.ModuleList(heads))
    net.exit_blocks = list(exits)
    net.block_paths = block_paths
    net.layer_sizes = list(layers)
    net.stem_path = stem_path
    init_weights(net)
    return net


def _check_exits(exits: Sequence[int] | None, total: int) -> list[int]:
    """1-based block indices, increasing, ending at the last block; None → after each layer (the caller's)."""
    if exits is None:
        return []
    out = sorted({int(e) for e in exits})
    if not out or out[0] < 1 or out[-1] != total or len(out) != len(exits):
        raise ValueError(
            f"exits must be distinct block numbers from 1 to {total}, the last being {total}; got {list(exits)}"
        )
    return out


@register_model
def resnet18(**kwargs: Any) -> MultiExitNet:
    """ResNet-18 with four exits."""
    return build_resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet34(**kwargs: Any) -> MultiExitNet:
    """ResNet-34 with four exits."""
    return build_resnet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50(**kwargs: Any) -> MultiExitNet:
    """ResNet-50 with four exits."""
    return build_resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def resnet101(**kwargs: Any) -> MultiExitNet:
    """ResNet-101 with four exits."""
    return build_resnet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model
def resnet152(**kwargs: Any) -> MultiExitNet:
    """ResNet-152 with four exits."""
    return build_resnet(Bottleneck, (3, 8, 36, 3), **kwargs)


@register_model
def resnet_fmnist(**kwargs: Any) -> MultiExitNet:
    """Compact 4-exit ResNet for 28x28 grayscale images (Fashion-MNIST), about 1 M parameters."""
    kwargs.setdefault("in_channels", 1)
    return build_resnet(BasicBlock, (2, 2, 2, 2), widths=(16, 32, 64, 128), **kwargs)


@register_model
def resnet_fmnist_narrow(**kwargs: Any) -> MultiExitNet:
    """`resnet_fmnist` at half the width (0.24 M parameters): for seed studies on a small CPU."""
    kwargs.setdefault("in_channels", 1)
    return build_resnet(BasicBlock, (2, 2, 2, 2), widths=(8, 16, 32, 64), **kwargs)


@register_model
def wide_resnet50_2(**kwargs: Any) -> MultiExitNet:
    """Wide ResNet-50-2 (torchvision's shape: bottlenecks twice as wide inside), four exits."""
    return build_resnet(Bottleneck, (3, 4, 6, 3), base_width=128, **kwargs)


@register_model
def resnext50_32x4d(**kwargs: Any) -> MultiExitNet:
    """ResNeXt-50 32x4d (torchvision's shape: 32 groups of width 4), four exits."""
    return build_resnet(Bottleneck, (3, 4, 6, 3), groups=32, base_width=4, **kwargs)
