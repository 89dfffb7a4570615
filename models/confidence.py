"""Calibrated confidence of an exit's prediction: what the exit rule compares with a threshold."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

Measure = Literal["max_softmax", "entropy", "margin"]
MEASURES: tuple[str, ...] = get_args(Measure)


def probabilities(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Softmax of `logits / temperature` in float32 (the calibrated class probabilities)."""
    return torch.softmax(logits.float() / temperature, dim=1)


def confidence_of(p: Tensor, measure: str = "max_softmax") -> Tensor:
    """Per-sample confidence in [0, 1] from class probabilities `p`.

    `max_softmax`: the top class's probability. `entropy`: 1 − H(p)/log C. `margin`: p₁ − p₂.
    """
    if measure == "max_softmax":
        return p.max(dim=1).values
    if measure == "entropy":
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
        return 1 - h / math.log(p.shape[1])
    if measure == "margin":
        top2 = p.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    raise ValueError(f"Unknown confidence measure {measure!r}; known: {', '.join(MEASURES)}")


def confidence(logits: Tensor, temperature: float = 1.0, measure: str = "max_softmax") -> Tensor:
    """Per-sample confidence of `logits` at `temperature` (see `confidence_of`)."""
    return confidence_of(probabilities(logits, temperature), measure)
