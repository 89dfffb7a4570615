"""Triton's inference statistics of a served version, read from the service's own Prometheus metrics.

One source: the figures `GET /v2/models/{m}/stats` and gRPC `ModelStatistics` report are the samples
/metrics shows (summed over request processes in multiprocess mode), so the two never disagree.
Triton's fields, from: `anytime_request_phase_seconds` (success, fail, queue, compute_input,
compute_infer, compute_output: count and time), `anytime_exits_total` (inference_count: samples
answered), `anytime_batch_size` (execution_count: the batches the engine formed), `anytime_stage_run_seconds`
(batch_stats: stage runs by the rows they computed) and `anytime_last_inference_timestamp_seconds`.
Anytime's own per-exit figures go in `exit_stats`, a field Triton's clients do not read.
Warm-up traffic is in none of them. Runs on the event loop of a request process.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric

from service.metrics import PHASES, Metrics

Key = tuple[str, str]  # (model, version)


@dataclass
class _Version:
    phases: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    runs: dict[int, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    exits: dict[int, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    reasons: dict[int, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    executions: float = 0.0
    last_inference_s: float = 0.0


def _duration(count: float, seconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(round(seconds * 1e9))}


def _read(families: Iterable[Metric]) -> dict[Key, _Version]:
    found: dict[Key, _Version] = defaultdict(_Version)
    for family in families:
        for s in family.samples:
            labels = s.labels
            if not labels.get("model") or s.name.endswith("_created"):
                continue
            v = found[(labels["model"], labels["version"])]
            # A summary's samples are NAME_count and NAME_sum: slot 0 counts, slot 1 sums.
            slot = 0 if s.name.endswith("_count") else 1
            if s.name.startswith("anytime_request_phase_seconds_"):
                v.phases[labels["phase"]][slot] += s.value
            elif s.name.startswith("anytime_stage_run_seconds_"):
                v.runs[int(labels["rows"])][slot] += s.value
            elif s.name.startswith("anytime_exit_latency_seconds_") and not s.name.endswith("_bucket"):
                v.exits[int(labels["exit"])][slot] += s.value
            elif s.name == "anytime_exits_total":
                reasons = v.reasons[int(labels["exit"])]
                reasons[labels["reason"]] = reasons.get(labels["reason"], 0.0) + s.value
            elif s.name == "anytime_batch_size_count":
                v.executions += s.value
            elif s.name == "anytime_last_inference_timestamp_seconds":
                v.last_inference_s = max(v.last_inference_s, s.value)
    return found


def _model_stats(name: str, version: str, v: _Version) -> dict[str, Any]:
    inference_count = sum(sum(r.values()) for r in v.reasons.values())
    stats = {phase: _duration(*v.phases[phase]) for phase in PHASES}
    return {
        "name": name,
        "version": version,
        "last_inference": int(v.last_inference_s * 1000),  # Triton's: ms since the epoch, 0 if never
        "inference_count": int(inference_count),
        "execution_count": int(v.executions),
        "inference_stats": {
            **stats,
            "cache_hit": _duration(0, 0),
            "cache_miss": _duration(0, 0),
        },
        "batch_stats": [
            {
                "batch_size": rows,
                "compute_input": _duration(0, 0),
                "compute_infer": _duration(*v.runs[rows]),
                "compute_output": _duration(0, 0),
            }
            for rows in sorted(v.runs)
        ],
        "memory_usage": [],
        "exit_stats": [
            {"exit": k, **_duration(*v.exits[k]), "reasons": {r: int(n) for r, n in sorted(v.reasons[k].items())}}
            for k in sorted(v.exits)
        ],
    }


def model_statistics(metrics: Metrics, versions: Iterable[Key]) -> list[dict[str, Any]]:
    """Triton's `model_stats` entries of `versions`, in that order (zeros for a version not yet asked)."""
    found = _read(metrics.collect())
    return [_model_stats(name, version, found.get((name, version), _Version())) for name, version in versions]
