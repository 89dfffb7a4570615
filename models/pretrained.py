"""Bring your own pretrained model: torchvision weights loaded into a multi-exit network.

`from_torchvision(arch, state_dict)` builds our network of the same architecture (ImageNet stem,
and for VGG torchvision's three-layer classifier) and maps every torchvision key onto it exactly:
the stages carry the backbone, the last exit head carries the classifier, and the shallow exit
heads start untrained (train them with `anytime-train --method ramps`). Any torchvision key that
does not map, any stage or classifier key left without a value, or any shape that differs raises
one error naming the keys, before anything is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torchvision.models.vgg import cfgs

from models.multi_exit import MultiExitNet
from models.registry import build_model

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d")
VGGS = {"vgg11_bn": "A", "vgg13_bn": "B", "vgg16_bn": "D", "vgg19_bn": "E"}
ARCHITECTURES = (*RESNETS, *VGGS)


class ImportMismatch(ValueError):
    """The weights do not fit the architecture; the message names the keys."""


def _resnet_key(key: str, model: MultiExitNet) -> str | None:
    """torchvision ResNet key → ours: the stem, each block where the model placed it, fc in the last head."""
    assert model.block_paths is not None and model.layer_sizes is not None and model.stem_path is not None
    if m := re.match(r"(conv1|bn1)\.(.+)", key):
        return f"{model.stem_path}.{0 if m[1] == 'conv1' else 1}.{m[2]}"
    if m := re.match(r"layer(\d)\.(\d+)\.(.+)", key):
        layer, j = int(m[1]) - 1, int(m[2])
        if layer >= len(model.layer_sizes) or j >= model.layer_sizes[layer]:
            return None
        return f"{model.block_paths[sum(model.layer_sizes[:layer]) + j]}.{m[3]}"
    if m := re.match(r"fc\.(.+)", key):
        return f"exits.{model.num_exits - 1}.fc.{m[1]}"
    return None


def _vgg_positions(cfg: list[Any]) -> list[tuple[int, int]]:
    """(stage, index) of each module of torchvision's `features`; stages end after pools 2, 3, 4 and 5."""
    positions, stage, index, pools = [], 0, 0, 0
    for v in cfg:
        for _ in range(1 if v == "M" else 3):  # a pool, or conv + batch norm + ReLU
            positions.append((stage, index))
            index += 1
        if v == "M":
            pools += 1
            if pools >= 2:
                stage, index = stage + 1, 0
    return positions


def _vgg_key(key: str, positions: list[tuple[int, int]]) -> str | None:
    if (m := re.match(r"features\.(\d+)\.(.+)", key)) and int(m[1]) < len(positions):
        stage, index = positions[int(m[1])]
        return f"stages.{stage}.{index}.{m[2]}"
    if m := re.match(r"classifier\.(\d+)\.(.+)", key):
        return f"exits.3.classifier.{m[1]}.{m[2]}"
    return None


def _num_classes(arch: str, state_dict: Mapping[str, Tensor]) -> int:
    key = "fc.weight" if arch in RESNETS else "classifier.6.weight"
    if key not in state_dict:
        raise ImportMismatch(f"{arch}: the weights have no {key!r} (is this a torchvision {arch} state dict?)")
    return int(state_dict[key].shape[0])


def from_torchvision(arch: str, state_dict: Mapping[str, Tensor], **exit_options: Any) -> MultiExitNet:
    """Our multi-exit `arch` carrying a torchvision state dict; its final exit computes torchvision's logits."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown torchvision architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    num_classes = _num_classes(arch, state_dict)
    options = {"stem": "imagenet", **({"classifier": "imagenet"} if arch in VGGS else {}), **exit_options}
    model = build_model(arch, num_classes, in_channels=3, **options)
    positions = _vgg_positions(cfgs[VGGS[arch]]) if arch in VGGS else []
    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        target = _vgg_key(key, positions) if arch in VGGS else _resnet_key(key, model)
        if target is None or target not in ours:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(ours[target].shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs {target} {tuple(ours[target].shape)}")
        else:
            mapped[target] = value
    last = f"exits.{model.num_exits - 1}."
    missing = [k for k in ours if k not in mapped and (k.startswith("stages.") or k.startswith(last))]
    problems = [
        f"{label}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
        for label, keys in (("unexpected keys", unexpected), ("missing keys", missing), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise ImportMismatch(f"{arch}: the weights do not fit: " + "; ".join(problems))
    model.load_state_dict({**ours, **mapped}, strict=True)
    return model.eval()
