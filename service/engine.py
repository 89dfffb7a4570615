"""The anytime engine: a bounded queue, one worker thread per device, stage-wise batched execution.

The worker takes up to `max_batch` requests (or those that arrive within `max_wait_ms`),
runs stage 1 and exit 1 for all of them, lets each sample leave as the exit policy says, and
runs the next stage only on the samples that remain (`index_select`). The asyncio loop never
runs the model: it enqueues a request and awaits its future.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.artifact import Artifact
from models.confidence import confidence
from service.metrics import Metrics
from service.policy import Reason, can_reach_first_exit, decide_exit
from service.timing import StageTimes

log = logging.getLogger("anytime.engine")


class QueueFull(Exception):
    """The request queue is full; the caller should retry later."""


class DeadlineUnreachable(Exception):
    """The deadline had passed, or exit 1 could not be reached in time; nothing was computed."""


class EngineFailure(Exception):
    """The model failed on the batch that held this request."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no more work."""


@dataclass
class Request:
    """One image waiting for an answer. `deadline` is on the `time.monotonic()` clock."""

    x: Tensor
    threshold: float | None = None
    max_exit: int | None = None
    deadline: float | None = None
    top_k: int = 1
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class Answer:
    """What the engine found for one request."""

    index: int
    confidence: float
    exit: int  # 1-based
    reason: Reason
    top_k: list[tuple[int, float]]
    queue_s: float
    compute_s: float


def _settle(req: Request, value: Answer | BaseException) -> None:
    """Complete the request's future from the worker thread (ignored if the client went away)."""
    if req.future is None or req.loop is None:
        return

    def apply() -> None:
        if req.future is None or req.future.done():
            return
        if isinstance(value, BaseException):
            req.future.set_exception(value)
        else:
            req.future.set_result(value)

    try:
        req.loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class Engine:
    """Runs an artifact's network stage by stage for batches of queued requests."""

    def __init__(
        self,
        artifact: Artifact,
        device: torch.device,
        metrics: Metrics,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        queue_size: int = 256,
    ) -> None:
        self.model = artifact.model.to(device).eval()
        self.manifest = artifact.manifest
        self.device = device
        self.metrics = metrics
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1e3
        self.num_exits = self.model.num_exits
        self.temperatures = [float(e["temperature"]) for e in self.manifest["exits"]]
        self.thresholds = [float(e["threshold"]) for e in self.manifest["exits"]]
        self.measure = self.manifest.get("policy", {}).get("confidence", "max_softmax")
        self.times = StageTimes.from_manifest(self.manifest["exits"])
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> None:
        """Warm up (so the first request pays no one-off costs) and start the worker thread."""
        if warmup:
            self.warmup()
        self._thread = threading.Thread(target=self._work, name=f"anytime-worker-{self.device}", daemon=True)
        self._thread.start()

    def warmup(self, rounds: int = 3) -> None:
        shape = (self.manifest["input"]["channels"], self.manifest["input"]["size"], self.manifest["input"]["size"])
        for bs in sorted({1, self.max_batch}):
            x = torch.zeros(bs, *shape)
            for _ in range(rounds):
                self._run_all_stages(x)

    def stop(self, drain_timeout_s: float) -> None:
        """Finish queued work for up to `drain_timeout_s`, then fail whatever is left, and stop."""
        end = time.monotonic() + drain_timeout_s
        while not self._queue.empty() and time.monotonic() < end:
            time.sleep(0.01)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, end - time.monotonic()) + 5)
        while True:
            try:
                _settle(self._queue.get_nowait(), EngineStopped("the server is shutting down"))
            except queue.Empty:
                break

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submission (event loop side) ------------------------------------------------------
    def submit(self, req: Request) -> asyncio.Future:
        """Enqueue `req` and return the future its answer will complete; raises QueueFull."""
        if self._stop.is_set():
            raise EngineStopped("the server is shutting down")
        req.loop = asyncio.get_running_loop()
        req.future = req.loop.create_future()
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise QueueFull("the request queue is full") from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return req.future

    # -- worker side -------------------------------------------------------------------------
    def _take_batch(self) -> list[Request]:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return []
        batch = [first]
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = until - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        return batch

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            batch = [r for r in self._take_batch() if r.future is None or not r.future.done()]
            if not batch:
                continue
            try:
                self._serve(batch)
            except Exception as exc:  # one bad batch must not take the worker down
                log.exception("batch of %d failed", len(batch))
                for req in batch:
                    _settle(req, EngineFailure(f"inference failed: {type(exc).__name__}"))

    def _admit(self, batch: list[Request]) -> list[Request]:
        """Answer 504 to requests that cannot make their deadline; return the rest."""
        now = time.monotonic()
        first = self.times.predict(0, len(batch))
        admitted = []
        for req in batch:
            if req.deadline is not None and now >= req.deadline:
                _settle(req, DeadlineUnreachable("the deadline passed while the request was queued"))
            elif not can_reach_first_exit(now, req.deadline, first):
                _settle(req, DeadlineUnreachable(f"exit 1 needs about {first * 1e3:.1f} ms; the deadline is sooner"))
            else:
                admitted.append(req)
        return admitted

    def _serve(self, batch: list[Request]) -> None:
        batch = self._admit(batch)
        if not batch:
            return
        self.metrics.batch_size.observe(len(batch))
        started = time.monotonic()
        x = torch.stack([r.x for r in batch]).to(self.device, non_blocking=True)
        if self.cuda:
            x = x.to(memory_format=torch.channels_last)
        rows = torch.arange(len(batch))  # which request each remaining row belongs to
        h = x
        with torch.inference_mode(), self._autocast():
            for k in range(self.num_exits):
                t0 = time.monotonic()
                h = self.model.run_stage(k, h)
                logits, _ = self.model.run_exit(k, h)
                conf = confidence(logits, self.temperatures[k], self.measure).cpu()  # the only per-stage copy
                now = time.monotonic()
                self.times.observe(k, len(rows), now - t0)
                self.metrics.stage_seconds.labels(stage=str(k + 1)).observe(now - t0)
                done = self._finish(batch, rows, logits, conf, k, now, started)
                if done.all():
                    break
                keep = torch.nonzero(~done).squeeze(1)
                h = h.index_select(0, keep.to(h.device))
                rows = rows[keep]

    def _finish(
        self, batch: list[Request], rows: Tensor, logits: Tensor, conf: Tensor, k: int, now: float, started: float
    ) -> Tensor:
        """Decide for every remaining row; answer the ones that stop at exit k. Returns the stop mask."""
        next_s = self.times.predict(k + 1, len(rows))
        done = torch.zeros(len(rows), dtype=torch.bool)
        reasons: dict[int, Reason] = {}
        for i, r in enumerate(rows.tolist()):
            req = batch[r]
            threshold = self.thresholds[k] if req.threshold is None else req.threshold
            reason = decide_exit(k, self.num_exits, float(conf[i]), threshold, req.max_exit, now, req.deadline, next_s)
            if reason is not None:
                done[i] = True
                reasons[i] = reason
        if not reasons:
            return done
        idx = torch.tensor(sorted(reasons))
        probs = torch.softmax(logits.index_select(0, idx.to(logits.device)).float() / self.temperatures[k], dim=1)
        top_p, top_i = probs.topk(min(max(batch[int(rows[i])].top_k for i in reasons), probs.shape[1]), dim=1)
        top_p, top_i = top_p.cpu(), top_i.cpu()
        for j, i in enumerate(idx.tolist()):
            req = batch[int(rows[i])]
            n = min(req.top_k, top_p.shape[1])
            pairs = [(int(top_i[j, m]), float(top_p[j, m])) for m in range(n)]
            answer = Answer(
                pairs[0][0], float(conf[i]), k + 1, reasons[i], pairs, started - req.enqueued, now - started
            )
            _settle(req, answer)
        return done

    def _run_all_stages(self, x: Tensor) -> None:
        with torch.inference_mode(), self._autocast():
            h = x.to(self.device)
            if self.cuda:
                h = h.to(memory_format=torch.channels_last)
            for k in range(self.num_exits):
                h = self.model.run_stage(k, h)
                self.model.run_exit(k, h)
            if self.cuda:
                torch.cuda.synchronize(self.device)

    def _autocast(self):  # type: ignore[no-untyped-def]
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()
