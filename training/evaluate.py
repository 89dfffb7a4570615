"""Evaluation: every exit's logits over a data set, per-exit and ensemble accuracy, report tables."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import Tensor

from models.multi_exit import MultiExitNet


def autocast_for(device: torch.device, amp_dtype: torch.dtype | None):
    """An autocast context on CUDA when a dtype is given, otherwise a no-op."""
    if amp_dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype)


@torch.inference_mode()
def collect_logits(
    model: MultiExitNet,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """Every exit's float32 logits (on the CPU) and the targets, over the whole loader."""
    was_training = model.training
    model.eval()
    per_exit: list[list[Tensor]] = [[] for _ in range(model.num_exits)]
    targets: list[Tensor] = []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad(), autocast_for(device, amp_dtype):
            out = model(x)
        for k, z in enumerate(out.logits):
            per_exit[k].append(z.float().cpu())
        targets.append(y.cpu())
    model.train(was_training)
    return [torch.cat(z) for z in per_exit], torch.cat(targets)


def accuracies(logits: list[Tensor], targets: Tensor) -> dict[str, float]:
    """Top-1 accuracy (%) of each exit (`exit1`…) and of the ensemble (mean of exit logits)."""
    result = {f"exit{k + 1}": _acc(z, targets) for k, z in enumerate(logits)}
    result["ensemble"] = _acc(torch.stack(logits).mean(0), targets)
    return result


def _acc(z: Tensor, y: Tensor) -> float:
    return float((z.argmax(1) == y).float().mean() * 100)


def format_accuracy_table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table like the paper's: one row per split (or method), a column per exit and the ensemble."""
    columns = list(next(iter(rows.values())))
    header = "| | " + " | ".join(c.replace("exit", "exit ") for c in columns) + " |"
    lines = [header, "|" + " --- |" * (len(columns) + 1)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)
