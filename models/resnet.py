"""Multi-exit ResNets (He et al. 2016) with BYOT exits after each of the four stages.

The residual blocks are torchvision's own, so the deepest path with the ImageNet stem and
1000 classes has exactly torchvision's parameter count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from models.multi_exit import MultiExitNet, build_exit_heads, init_weights
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
    **block_kw: Any,
) -> MultiExitNet:
    """A ResNet-style multi-exit network: stem, one stage per entry of `layers`, an exit per stage."""
    stages: list[nn.Module] = []
    inplanes = widths[0]
    channels: list[int] = []
    for i, (planes, blocks) in enumerate(zip(widths, layers, strict=True)):
        layer = make_layer(block, inplanes, planes, blocks, 1 if i == 0 else 2, **block_kw)
        inplanes = planes * block.expansion
        channels.append(inplanes)
        stages.append(nn.Sequential(make_stem(in_channels, widths[0], stem), layer) if i == 0 else layer)
    n = len(stages)
    downsamples = [n - 1 - i for i in range(n)]
    heads = build_exit_heads(
        channels, downsamples, num_classes, style=exit_style, attention=attention, reduction=block.expansion
    )
    net = MultiExitNet(stages, heads)
    init_weights(net)
    return net


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
