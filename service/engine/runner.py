"""Stage runners: run stage k, exit k and the calibrated confidence for a batch of rows; decide nothing.

`EagerRunner` calls the modules (CPU; the CUDA fallback). `CudaGraphRunner` replays, per stage
and per batch-size bucket, one CUDA graph of stage k + exit k + softmax + confidence, captured
during warm-up: rows are padded up to the bucket in a static input buffer, inputs of stage 1 are
staged through pinned host memory, and the only device-to-host copy of a stage is its rows'
confidences. Eager CUDA launches each of a stage's kernels from Python, so a stage cost as much
at batch 1 as at 64 (docs/server.md, "On a GPU"); a replay launches them all at once.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.confidence import confidence_of, probabilities
from models.multi_exit import MultiExitNet
from service.engine.fusion import fold_batchnorm

log = logging.getLogger("anytime.engine")


@dataclass
class StageOutput:
    """One stage's results for `n` rows: the next stage's input, the exit's probabilities and confidences."""

    h: Tensor | None  # None after the last stage
    p: Tensor  # float32 [n, classes], calibrated
    conf: np.ndarray  # float64 [n], on the host


class EagerRunner:
    """Stage k, exit k and the confidence as eager module calls, in channels_last (with bf16 autocast
    on CUDA; on a CPU with batch norm folded into the convolutions, `service/engine/fusion.py`)."""

    def __init__(self, model: MultiExitNet, device: torch.device, temperatures: Sequence[float], measure: str) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.model = model.to(device).eval()
        if not self.cuda:
            fold_batchnorm(self.model)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.num_exits = self.model.num_exits
        self.temperatures = list(temperatures)
        self.measure = measure
        self.graph_bytes = 0  # device memory held by captured graphs

    def bucket(self, n: int) -> int:
        """The batch size a run of `n` rows costs as (eager: `n` itself)."""
        return n

    def autocast(self) -> AbstractContextManager[object]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def to_device(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.to(memory_format=torch.channels_last) if x.dim() == 4 else x

    def load(self, xs: Sequence[Tensor]) -> Tensor:
        """Stage 1's input for these samples (each C×H×W on the host)."""
        return self.to_device(torch.stack(list(xs)))

    def _body(self, k: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.model.run_stage(k, h)
        logits, _ = self.model.run_exit(k, h)
        p = probabilities(logits, self.temperatures[k])  # the one softmax of this exit
        return h, p, confidence_of(p, self.measure)

    def run(self, k: int, h: Tensor) -> StageOutput:
        """Stage `k` (0-based) and exit `k` for the rows of `h`."""
        with torch.inference_mode(), self.autocast():
            h, p, conf = self._body(k, h)
        return StageOutput(h if k < self.num_exits - 1 else None, p, conf.cpu().numpy().astype(np.float64))

    def warmup(self, shape: Sequence[int], batch_sizes: Sequence[int], rounds: int = 3) -> None:
        """Run every stage at each batch size (first calls pay one-off costs)."""
        for bs in sorted(set(batch_sizes)):
            for _ in range(rounds):
                h = self.load([torch.zeros(*shape)] * bs)
                for k in range(self.num_exits):
                    out = self.run(k, h)
                    if out.h is not None:
                        h = out.h
        if self.cuda:
            torch.cuda.synchronize(self.device)


def default_buckets(max_batch: int) -> list[int]:
    """Graph batch sizes: 1, 8, 32, 128, 512 up to `max_batch`, and `max_batch` itself."""
    return sorted({b for b in (1, 8, 32, 128, 512) if b < max_batch} | {max_batch})


class CudaGraphRunner(EagerRunner):
    """Each stage (+ exit + confidence) replayed as a CUDA graph at the smallest bucket that holds the rows."""

    def __init__(
        self,
        model: MultiExitNet,
        device: torch.device,
        temperatures: Sequence[float],
        measure: str,
        buckets: Sequence[int],
    ) -> None:
        super().__init__(model, device, temperatures, measure)
        if not self.cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.buckets = sorted(set(buckets))
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor, tuple[Tensor, Tensor, Tensor]]] = {}
        self._staging: Tensor | None = None
        self._conf_host: Tensor | None = None
        self._event: torch.cuda.Event | None = None

    def bucket(self, n: int) -> int:
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets):
            raise ValueError(f"{n} rows exceed the largest graph bucket {self.buckets[-1]}")
        return self.buckets[i]

    def _graph_body(self, k: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # The autocast cache must be off inside a capture (PyTorch's CUDA graphs notes).
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return self._body(k, h)

    def capture(self, shape: Sequence[int]) -> None:
        """Capture every (stage, bucket) graph, largest bucket first, in one shared memory pool."""
        torch.backends.cudnn.benchmark = True
        before = torch.cuda.memory_reserved(self.device)
        largest = self.buckets[-1]
        self._staging = torch.empty((largest, *shape), pin_memory=True)
        self._conf_host = torch.empty(largest, dtype=torch.float32, pin_memory=True)
        self._event = torch.cuda.Event()
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            inputs = self._stage_inputs(shape)
            for b in reversed(self.buckets):
                for k in range(self.num_exits):
                    self.graphs[(k, b)] = self._capture_one(k, inputs[k], b, pool)
        torch.cuda.synchronize(self.device)
        self.graph_bytes = torch.cuda.memory_reserved(self.device) - before
        log.info("captured %d CUDA graphs (%.0f MiB)", len(self.graphs), self.graph_bytes / 2**20)

    def _stage_inputs(self, shape: Sequence[int]) -> list[Tensor]:
        """A one-row example of each stage's input (shape, dtype, layout), from one eager pass."""
        h = self.to_device(torch.zeros(1, *shape))
        examples = []
        with self.autocast():
            for k in range(self.num_exits):
                examples.append(h)
                h = self.model.run_stage(k, h)
        return examples

    def _capture_one(
        self, k: int, example: Tensor, b: int, pool: tuple[int, int]
    ) -> tuple[torch.cuda.CUDAGraph, Tensor, tuple[Tensor, Tensor, Tensor]]:
        static = torch.zeros((b, *example.shape[1:]), dtype=example.dtype, device=self.device)
        if static.dim() == 4:
            static = static.contiguous(memory_format=torch.channels_last)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up before capture (cuDNN picks its algorithms here)
                self._graph_body(k, static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a model version loading beside a serving one must not break the other's launches.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = self._graph_body(k, static)
        return graph, static, out

    def load(self, xs: Sequence[Tensor]) -> Tensor:
        """Stage 1's input staged in pinned host memory (copied into the graph's buffer by `run`)."""
        assert self._staging is not None
        return torch.stack(list(xs), out=self._staging[: len(xs)])

    def run(self, k: int, h: Tensor) -> StageOutput:
        n = h.shape[0]
        graph, static, (h_out, p, conf) = self.graphs[(k, self.bucket(n))]
        assert self._conf_host is not None and self._event is not None
        with torch.inference_mode():
            static[:n].copy_(h, non_blocking=True)
            graph.replay()
            host = self._conf_host[:n]
            host.copy_(conf[:n], non_blocking=True)
            self._event.record()
            # The outputs live in the graph's buffers, which its next replay overwrites: keep copies.
            rows_h = h_out[:n].clone() if k < self.num_exits - 1 else None
            rows_p = p[:n].clone()
            self._event.synchronize()  # the one host sync of a stage
        return StageOutput(rows_h, rows_p, host.numpy().astype(np.float64))
