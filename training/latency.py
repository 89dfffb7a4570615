"""Latency profile of each stage and exit head, per batch size, on the device the model runs on."""

from __future__ import annotations

import statistics
import time

import torch

from models.artifact import StageLatency
from models.multi_exit import MultiExitNet

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
