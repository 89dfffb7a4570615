"""Every Prometheus metric the service exports, declared once (names are part of the contract).

Per-model series carry `model` and `version` labels, so one process serving several models (or
rolling a model to a new version) still sums correctly in the dashboard. `ModelMetrics` holds a
version's children, bound once, for the hot path.

With several request processes (ANYTIME_WORKERS > 1, service/workers/) every process writes its
samples to files in PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode) and any of them
answers /metrics with the sum: counters and histograms add up over processes, and each gauge says
how it combines (`MODES`). Counters of a process that died keep their totals.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

# Sub-millisecond to seconds: a shallow exit of a small model answers in well under 1 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MV = ["model", "version"]
# How a gauge combines over processes in multiprocess mode: the engine process alone sets the
# per-model ones (the most recent value of a live process), every request process its in-flight count.
SUM, RECENT = "livesum", "livemostrecent"
# The phases of `anytime_request_phase_seconds`: the whole request, then the parts of an answered one.
PHASES = ("success", "fail", "compute_input", "queue", "compute_infer", "compute_output")


def multiprocess() -> bool:
    """Whether samples go to PROMETHEUS_MULTIPROC_DIR (set by the supervisor of several request processes)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The service's metrics, registered in `registry` (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "anytime_requests",
            "Inference requests by protocol and the (HTTP-equivalent) status they ended with",
            [*MV, "protocol", "status"],
            registry=r,
        )
        self.exits = Counter(
            "anytime_exits", "Samples answered, by exit (1-based) and reason", [*MV, "exit", "reason"], registry=r
        )
        self.request_latency = Histogram(
            "anytime_request_latency_seconds",
            "Server-side latency of inference requests",
            MV,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exit_latency = Histogram(
            "anytime_exit_latency_seconds",
            "Latency of samples by the exit that answered",
            [*MV, "exit"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "anytime_stage_seconds",
            "Time of one stage and its exit head for a batch",
            [*MV, "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.deadlines = Counter(
            "anytime_deadline",
            "Requests with a deadline: met, missed (the answer was ready after it: 504), or rejected unstarted",
            [*MV, "outcome"],
            registry=r,
        )
        self.stage_rows = Histogram(
            "anytime_stage_rows",
            "Rows one run of a stage computed (merged from several batches past exit 1)",
            [*MV, "stage"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "anytime_queue_depth", "Rows waiting in the stage queues", MV, registry=r, multiprocess_mode=SUM
        )
        self.brownout = Gauge(
            "anytime_brownout",
            "Exits taken off the end for new work under overload (0: none)",
            MV,
            registry=r,
            multiprocess_mode=RECENT,
        )
        self.max_exit = Gauge(
            "anytime_max_exit", "Deepest exit new work may reach (1-based)", MV, registry=r, multiprocess_mode=RECENT
        )
        # One series per process, over every model and protocol: what an autoscaler scales on.
        self.inflight = Gauge(
            "anytime_inflight", "Inference requests admitted and not yet answered", registry=r, multiprocess_mode=SUM
        )
        self.batch_size = Histogram(
            "anytime_batch_size", "Requests per engine batch", MV, buckets=BATCH_BUCKETS, registry=r
        )
        # Triton's inference statistics (GET /v2/models/{m}/stats) are read from these three.
        self.phases = Summary(
            "anytime_request_phase_seconds",
            "Inference requests by phase: success and fail (the whole request), queue, compute_input "
            "(reading and decoding), compute_infer (the engine), compute_output (the response)",
            [*MV, "phase"],
            registry=r,
        )
        self.stage_runs = Summary(
            "anytime_stage_run_seconds", "Stage runs by the rows they computed", [*MV, "rows"], registry=r
        )
        self.last_inference = Gauge(
            "anytime_last_inference_timestamp_seconds",
            "When the version last answered a request (Unix time)",
            MV,
            registry=r,
            multiprocess_mode="max",
        )
        self.model_info = Gauge(
            "anytime_model_info",
            "A model version being served (1 per served version)",
            ["name", "version", "device"],
            registry=r,
            multiprocess_mode="livemax",  # the engine process and every request process set it to 1
        )
        self.load_failures = Counter(
            "anytime_model_load_failures", "Versions that failed to load (never served)", ["model"], registry=r
        )
        self.shadow_samples = Counter(
            "anytime_shadow_samples",
            "Early answers also run to the final exit (drift guard)",
            [*MV, "exit"],
            registry=r,
        )
        self.shadow_agreements = Counter(
            "anytime_shadow_agreements",
            "Shadow-checked early answers the final exit labelled alike",
            [*MV, "exit"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "anytime_shadow_dropped", "Shadow checks dropped because their queue was full", MV, registry=r
        )
        self.expected_agreement = Gauge(
            "anytime_exit_expected_agreement",
            "Validation agreement with the final exit of the samples an exit answers (from the manifest)",
            [*MV, "exit"],
            registry=r,
            multiprocess_mode=RECENT,
        )
        self.threshold = Gauge(
            "anytime_threshold",
            "Confidence threshold in force per exit",
            [*MV, "exit"],
            registry=r,
            multiprocess_mode=RECENT,
        )

        self.loop_lag = Gauge(
            "anytime_event_loop_lag_seconds",
            "How far behind its timers the event loop runs (mean over 50 ms): requests wait this long to be read",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.resend_holds = Counter(
            "anytime_resend_holds",
            "Requests resent at once after a refusal on the same connection: refused unattempted, the refusal held",
            registry=r,
        )
        self.refused_from_headers = Counter(
            "anytime_refused_from_headers",
            "Refusals decided from the request's headers, before its body was read and without an ASGI task",
            registry=r,
        )
        self.worker_requests = Counter(
            "anytime_worker_requests",
            "Inference requests by the request process that answered them (several request processes only)",
            ["worker"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "anytime_worker_restarts", "Processes of this server restarted after they died", ["role"], registry=r
        )

    def exposition(self) -> tuple[bytes, str]:
        """The /metrics page and its content type (summed over every process in multiprocess mode)."""
        return generate_latest(self._source()), CONTENT_TYPE_LATEST

    def collect(self) -> list[Metric]:
        """Every metric family as /metrics shows it (summed over processes in multiprocess mode)."""
        return list(self._source().collect())

    def _source(self) -> CollectorRegistry:
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return registry
        return self.registry

    def for_model(self, name: str, version: str, device: str) -> ModelMetrics:
        """The children of one served version, and its `anytime_model_info` series set to 1."""
        self.model_info.labels(name=name, version=version, device=device).set(1)
        return ModelMetrics(self, name, version, device)


@dataclass
class ModelMetrics:
    """One model version's metric children (bound once; labels() costs microseconds per call)."""

    metrics: Metrics
    name: str
    version: str
    device: str

    def __post_init__(self) -> None:
        m, mv = self.metrics, (self.name, self.version)
        self.queue_depth = m.queue_depth.labels(*mv)
        self.batch_size = m.batch_size.labels(*mv)
        self.request_latency = m.request_latency.labels(*mv)
        self._exits: dict[tuple[int, str], Counter] = {}
        self._exit_latency: dict[int, Histogram] = {}
        self._stages: dict[int, Histogram] = {}
        self._stage_rows: dict[int, Histogram] = {}
        self._deadlines = {o: m.deadlines.labels(*mv, o) for o in ("met", "missed", "rejected")}
        self._phases = {p: m.phases.labels(*mv, p) for p in PHASES}
        self._stage_runs: dict[int, Summary] = {}
        self._requests: dict[tuple[str, int], Counter] = {}
        self.last_inference = m.last_inference.labels(*mv)
        self._per_exit_gauges: set[tuple[Gauge, str]] = set()

    def answered(self, exit_: int, reason: str, seconds: float) -> None:
        key = (exit_, reason)
        if key not in self._exits:
            self._exits[key] = self.metrics.exits.labels(self.name, self.version, str(exit_), reason)
            self._exit_latency.setdefault(exit_, self.metrics.exit_latency.labels(self.name, self.version, str(exit_)))
        self._exits[key].inc()
        self._exit_latency[exit_].observe(seconds)

    def deadline(self, outcome: str) -> None:
        self._deadlines[outcome].inc()

    def phases(self, ok: bool, total: float, parts: tuple[float, float, float, float] | None) -> None:
        """One request's time, whole (as `success` or `fail`) and, when answered, by phase (`PHASES[2:]`)."""
        self._phases["success" if ok else "fail"].observe(total)
        if parts is not None:
            for phase, seconds in zip(PHASES[2:], parts, strict=True):
                self._phases[phase].observe(max(0.0, seconds))
            self.last_inference.set(time.time())

    def stage_run(self, rows: int, seconds: float) -> None:
        if rows not in self._stage_runs:
            self._stage_runs[rows] = self.metrics.stage_runs.labels(self.name, self.version, str(rows))
        self._stage_runs[rows].observe(seconds)

    def stage(self, k: int) -> Histogram:
        """The `anytime_stage_seconds` child of 0-based stage `k`."""
        if k not in self._stages:
            self._stages[k] = self.metrics.stage_seconds.labels(self.name, self.version, str(k + 1))
        return self._stages[k]

    def stage_rows(self, k: int) -> Histogram:
        """The `anytime_stage_rows` child of 0-based stage `k`."""
        if k not in self._stage_rows:
            self._stage_rows[k] = self.metrics.stage_rows.labels(self.name, self.version, str(k + 1))
        return self._stage_rows[k]

    def set_brownout(self, level: int, max_exit: int) -> None:
        self.metrics.brownout.labels(self.name, self.version).set(level)
        self.metrics.max_exit.labels(self.name, self.version).set(max_exit)

    def request(self, protocol: str, status: int) -> None:
        key = (protocol, status)
        if key not in self._requests:
            self._requests[key] = self.metrics.requests.labels(self.name, self.version, protocol, str(status))
        self._requests[key].inc()

    def shadow(self, exit_: int, agreed: bool) -> None:
        """One shadow check of an answer given at (1-based) `exit_`."""
        labels = (self.name, self.version, str(exit_))
        self.metrics.shadow_samples.labels(*labels).inc()
        self.metrics.shadow_agreements.labels(*labels).inc(1 if agreed else 0)  # the series exists from 0

    def shadow_dropped(self) -> None:
        self.metrics.shadow_dropped.labels(self.name, self.version).inc()

    def set_thresholds(self, thresholds: list[float]) -> None:
        for k, t in enumerate(thresholds):
            self._gauge(self.metrics.threshold, k).set(t)

    def set_expected(self, expected: list[float | None]) -> None:
        for k, e in enumerate(expected):
            if e is not None:
                self._gauge(self.metrics.expected_agreement, k).set(e)

    def _gauge(self, gauge: Gauge, k: int) -> Gauge:
        self._per_exit_gauges.add((gauge, str(k + 1)))
        return gauge.labels(self.name, self.version, str(k + 1))

    def released(self) -> None:
        """The version no longer serves: its gauges go (counters keep their totals). In multiprocess mode a
        removed series keeps its last value in the process's file, so it is zeroed first."""
        self.metrics.model_info.labels(self.name, self.version, self.device).set(0)
        self.metrics.model_info.remove(self.name, self.version, self.device)
        for gauge in (self.metrics.queue_depth, self.metrics.brownout, self.metrics.max_exit):
            gauge.remove(self.name, self.version)
        for gauge, exit_ in self._per_exit_gauges:
            gauge.remove(self.name, self.version, exit_)
