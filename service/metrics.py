"""Every Prometheus metric the service exports, declared once (names are part of the contract)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sub-millisecond to seconds: a shallow exit of a small model answers in well under 1 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's metrics, registered in `registry` (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "anytime_requests", "HTTP classification requests by status code", ["status"], registry=r
        )
        self.exits = Counter(
            "anytime_exits", "Samples answered, by exit (1-based) and reason", ["exit", "reason"], registry=r
        )
        self.request_latency = Histogram(
            "anytime_request_latency_seconds", "Server-side latency of /classify", buckets=LATENCY_BUCKETS, registry=r
        )
        self.exit_latency = Histogram(
            "anytime_exit_latency_seconds", "Latency of samples by the exit that answered", ["exit"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "anytime_stage_seconds", "Time of one stage and its exit head for a batch", ["stage"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.deadlines = Counter(
            "anytime_deadline", "Requests with a deadline: met, missed, or rejected unstarted", ["outcome"], registry=r
        )
        self.queue_depth = Gauge("anytime_queue_depth", "Requests waiting for the worker", registry=r)
        self.batch_size = Histogram(
            "anytime_batch_size", "Requests per engine batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "anytime_model_info", "The model being served", ["name", "version", "device"], registry=r
        )
