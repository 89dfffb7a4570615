"""Cost of each exit: parameters and FLOPs of the path stem → stage k → exit k, and measured latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.artifact import StageLatency
from models.multi_exit import MultiExitNet


@dataclass(frozen=True)
class ExitCost:
    """Cost of answering at one exit (1-based `exit`)."""

    exit: int
    params: int
    flops: int
    flops_fraction: float  # of the full network's deepest path
    stage_flops: int  # this stage alone
    head_flops: int  # this exit head alone
    served_flops_fraction: float  # what answering here costs when served: every earlier head ran too

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _count_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _flops(fn: Callable[..., object], *args: object) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return counter.get_total_flops(), out


@torch.no_grad()
def exit_costs(model: MultiExitNet, input_shape: tuple[int, int, int]) -> list[ExitCost]:
    """Per-exit parameters and FLOPs (convolutions and matmuls, 2 per multiply-add) for one image."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        h = torch.zeros(1, *input_shape, device=device)
        stage_flops: list[int] = []
        head_flops: list[int] = []
        for k in range(model.num_exits):
            f_stage, h = _flops(model.run_stage, k, h)
            f_head, _ = _flops(model.run_exit, k, h)
            stage_flops.append(f_stage)
            head_flops.append(f_head)
    finally:
        model.train(was_training)
    full = sum(stage_flops) + head_flops[-1]
    costs = []
    for k in range(model.num_exits):
        path = sum(stage_flops[: k + 1]) + head_flops[k]
        served = sum(stage_flops[: k + 1]) + sum(head_flops[: k + 1])
        params = _count_params(*model.stages[: k + 1], model.exits[k])
        costs.append(ExitCost(k + 1, params, path, path / full, stage_flops[k], head_flops[k], served / full))
    return costs


def format_cost_table(costs: list[ExitCost]) -> str:
    """A plain-text table of per-exit costs."""
    lines = [f"{'exit':>4}  {'params':>12}  {'MFLOPs':>10}  {'of full':>7}  {'head MFLOPs':>11}"]
    for c in costs:
        mflops, head = c.flops / 1e6, c.head_flops / 1e6
        lines.append(f"{c.exit:>4}  {c.params:>12,}  {mflops:>10.2f}  {c.flops_fraction:>7.1%}  {head:>11.2f}")
    return "\n".join(lines)


BATCH_SIZES = (1, 8, 32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def profile_latency(
    model: MultiExitNet,
    input_shape: tuple[int, int, int],
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    repeats: int = 40,
    warmup: int = 5,
) -> list[dict[str, StageLatency]]:
    """Median milliseconds of stage k and exit head k, for each batch size (after warm-up).

    Returns one dict per exit, keyed by batch size: ``{"1": StageLatency(...), "8": ..., ...}``.
    """
    model.eval()
    device = next(model.parameters()).device
    result: list[dict[str, StageLatency]] = [{} for _ in range(model.num_exits)]
    for bs in batch_sizes:
        x = torch.randn(bs, *input_shape, device=device)
        stage_times: list[list[float]] = [[] for _ in range(model.num_exits)]
        head_times: list[list[float]] = [[] for _ in range(model.num_exits)]
        for rep in range(warmup + repeats):
            h = x
            for k in range(model.num_exits):
                _sync(device)
                t0 = time.perf_counter()
                h = model.run_stage(k, h)
                _sync(device)
                t1 = time.perf_counter()
                model.run_exit(k, h)
                _sync(device)
                t2 = time.perf_counter()
                if rep >= warmup:
                    stage_times[k].append((t1 - t0) * 1e3)
                    head_times[k].append((t2 - t1) * 1e3)
        for k in range(model.num_exits):
            result[k][str(bs)] = StageLatency(
                stage_ms=round(statistics.median(stage_times[k]), 4),
                head_ms=round(statistics.median(head_times[k]), 4),
            )
    return result
