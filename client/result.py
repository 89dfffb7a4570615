"""The typed answer of /classify."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TopK:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Result:
    """One image's answer, plus the round trip the client measured (over every attempt) and how many
    attempts it took."""

    label: str
    index: int
    confidence: float
    exit: int
    exits: int
    reason: str
    top_k: tuple[TopK, ...]
    latency_ms: float
    queue_ms: float
    model: str
    version: str
    round_trip_ms: float
    attempts: int = 1

    @classmethod
    def from_json(cls, body: dict[str, Any], round_trip_ms: float, attempts: int = 1) -> Result:
        top = tuple(TopK(t["label"], int(t["index"]), float(t["probability"])) for t in body["top_k"])
        return cls(
            body["label"],
            int(body["index"]),
            float(body["confidence"]),
            int(body["exit"]),
            int(body["exits"]),
            body["reason"],
            top,
            float(body["latency_ms"]),
            float(body["queue_ms"]),
            body["model"],
            str(body["version"]),
            round_trip_ms,
            attempts,
        )
