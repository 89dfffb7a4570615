"""Statistics of a load run: exact, on plain Python numbers."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass
class Record:
    """One request of a load run."""

    t: float  # seconds from the start of the run to sending
    latency_ms: float  # client-side round trip
    status: int  # HTTP status; 0 when no answer came (client timeout or connection error)
    exit: int | None = None
    reason: str | None = None
    correct: bool | None = None
    deadline_ms: float | None = None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between order statistics (NumPy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def attainment(records: list[Record]) -> float:
    """Share of requests with a deadline answered 200 within it (client-side round trip)."""
    with_deadline = [r for r in records if r.deadline_ms is not None]
    if not with_deadline:
        return math.nan
    met = [r for r in with_deadline if r.status == 200 and r.latency_ms <= r.deadline_ms]
    return len(met) / len(with_deadline)


def by_deadline(records: list[Record]) -> dict[str, dict[str, float]]:
    """Per deadline: requests, attainment, share answered, share stopped by the deadline, accuracy of answers."""
    out = {}
    for d in sorted({r.deadline_ms for r in records if r.deadline_ms is not None}):
        rs = [r for r in records if r.deadline_ms == d]
        ok = [r for r in rs if r.status == 200]
        out[f"{d:g}"] = {
            "requests": len(rs),
            "attainment": attainment(rs),
            "answered": len(ok) / len(rs),
            "early_by_deadline": sum(r.reason == "deadline" for r in ok) / max(1, len(ok)),
            "accuracy": sum(bool(r.correct) for r in ok) / max(1, len(ok)),
        }
    return out


def summarize(records: list[Record], duration_s: float) -> dict[str, Any]:
    """Throughput, latency percentiles, accuracy, exit distribution and deadline attainment."""
    ok = [r for r in records if r.status == 200]
    lat = [r.latency_ms for r in ok]
    judged = [r for r in ok if r.correct is not None]
    exits = Counter(r.exit for r in ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "status_counts": {str(k): v for k, v in sorted(Counter(r.status for r in records).items())},
        "duration_s": duration_s,
        "throughput_rps": len(ok) / duration_s if duration_s > 0 else math.nan,
        "latency_ms": {
            "mean": sum(lat) / len(lat) if lat else math.nan,
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
        },
        "accuracy": sum(r.correct for r in judged) / len(judged) if judged else math.nan,
        "exit_distribution": {str(k): v / len(ok) for k, v in sorted(exits.items())} if ok else {},
        "deadline_attainment": attainment(records),
        "answered_early_by_deadline": sum(r.reason == "deadline" for r in ok) / len(ok) if ok else math.nan,
    }


def format_summary(name: str, s: dict[str, Any]) -> str:
    """A readable table of one run's summary."""
    lat = s["latency_ms"]
    exits = ", ".join(f"{k}: {v:.1%}" for k, v in s["exit_distribution"].items()) or "-"
    rows = [
        ("run", name),
        ("requests (ok)", f"{s['requests']} ({s['ok']})"),
        ("status counts", ", ".join(f"{k}: {v}" for k, v in s["status_counts"].items())),
        ("throughput", f"{s['throughput_rps']:.1f} req/s"),
        ("latency ms mean/p50/p95/p99", f"{lat['mean']:.2f} / {lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f}"),
        ("accuracy", f"{s['accuracy']:.2%}" if s["accuracy"] == s["accuracy"] else "-"),
        ("exit distribution", exits),
        (
            "deadline attainment",
            f"{s['deadline_attainment']:.1%}" if s["deadline_attainment"] == s["deadline_attainment"] else "-",
        ),
        ("answered at deadline", f"{s['answered_early_by_deadline']:.1%}" if s["ok"] else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
