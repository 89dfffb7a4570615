"""Per-exit temperature scaling (Guo et al. 2017) and expected calibration error."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T), fitted with LBFGS on log T."""
    # clone(): the logits may come from inference mode, which autograd cannot record.
    logits, targets = logits.detach().float().clone(), targets.detach().clone()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def nll(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood at `temperature`."""
    return float(F.cross_entropy(logits.float() / temperature, targets))


def expected_calibration_error(confidences: Tensor, correct: Tensor, bins: int = 15) -> float:
    """ECE: Σ_b |B_b|/N · |accuracy(B_b) − confidence(B_b)| over equal-width confidence bins."""
    confidences, correct = confidences.float(), correct.float()
    edges = torch.linspace(0, 1, bins + 1)
    total = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidences > lo) & (confidences <= hi) if lo > 0 else (confidences >= lo) & (confidences <= hi)
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidences[in_bin].mean()).abs()
            total += in_bin.float().mean() * gap
    return float(total)


def ece_of_logits(logits: Tensor, targets: Tensor, temperature: float = 1.0, bins: int = 15) -> float:
    """ECE of max-softmax confidence at `temperature`."""
    p = torch.softmax(logits.float() / temperature, dim=1)
    conf, pred = p.max(1)
    return expected_calibration_error(conf, pred == targets, bins)
