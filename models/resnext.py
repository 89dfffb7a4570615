"""Multi-exit ResNeXt for CIFAR (Xie et al. 2017): three stages of grouped bottlenecks."""

from __future__ import annotations

from typing import Any

from torchvision.models.resnet import Bottleneck

from models.multi_exit import MultiExitNet
from models.registry import register_model
from models.resnet import build_resnet


@register_model
def resnext29_8x64d(**kwargs: Any) -> MultiExitNet:
    """ResNeXt-29 with cardinality 8 and bottleneck width 64 (34.4 M parameters), three exits."""
    return build_resnet(Bottleneck, (3, 3, 3), widths=(64, 128, 256), groups=8, base_width=64, **kwargs)
