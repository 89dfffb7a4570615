"""Multi-exit VGG with batch norm (Simonyan & Zisserman 2015), four exits.

The five conv blocks are grouped into four stages (blocks 1-2, 3, 4, 5), one exit after each,
as in BYOT's VGG19 table. `classifier="cifar"` (default) ends in one linear layer on the
globally pooled 512 channels, as CIFAR VGGs and BYOT do. `classifier="imagenet"` ends in
torchvision's 7x7-pooled three-layer classifier, so the deepest path then has exactly
torchvision's `vgg*_bn` parameter count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.vgg import cfgs

from models.multi_exit import MultiExitNet, build_exit_heads, init_weights
from models.registry import register_model


class VGGClassifier(nn.Module):
    """torchvision's VGG classifier; its hint feature is the globally pooled final map."""

    def __init__(self, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.classifier(torch.flatten(self.avgpool(h), 1))
        return logits, h.mean(dim=(2, 3))


def _blocks(cfg: list[int | str], in_channels: int) -> list[nn.Sequential]:
    blocks: list[nn.Sequential] = []
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            blocks.append(nn.Sequential(*layers))
            layers = []
        else:
            layers += [nn.Conv2d(in_channels, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(True)]
            in_channels = int(v)
    return blocks


def build_vgg(
    cfg_name: str,
    num_classes: int,
    in_channels: int = 3,
    stem: str = "cifar",
    classifier: str = "cifar",
    exit_style: str = "conv",
    attention: bool = False,
) -> MultiExitNet:
    """VGG-BN from torchvision's layer config `cfg_name` ("A", "B", "D", "E"). VGG has no stem; `stem` is ignored."""
    b = _blocks(cfgs[cfg_name], in_channels)
    stages = [nn.Sequential(*b[0], *b[1]), b[2], b[3], b[4]]
    channels = [128, 256, 512, 512]
    final = VGGClassifier(num_classes) if classifier == "imagenet" else None
    if classifier not in ("cifar", "imagenet"):
        raise ValueError(f"Unknown classifier {classifier!r}; use 'cifar' or 'imagenet'")
    heads = build_exit_heads(
        channels, [3, 2, 1, 0], num_classes, final_head=final, style=exit_style, attention=attention
    )
    net = MultiExitNet(stages, heads)
    init_weights(net)
    return net


@register_model
def vgg11_bn(**kwargs: Any) -> MultiExitNet:
    """VGG-11 with batch norm, four exits."""
    return build_vgg("A", **kwargs)


@register_model
def vgg13_bn(**kwargs: Any) -> MultiExitNet:
    """VGG-13 with batch norm, four exits."""
    return build_vgg("B", **kwargs)


@register_model
def vgg16_bn(**kwargs: Any) -> MultiExitNet:
    """VGG-16 with batch norm, four exits."""
    return build_vgg("D", **kwargs)


@register_model
def vgg19_bn(**kwargs: Any) -> MultiExitNet:
    """VGG-19 with batch norm, four exits."""
    return build_vgg("E", **kwargs)
