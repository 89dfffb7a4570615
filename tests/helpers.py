"""Test helpers: small artifacts made on the spot, and a real `anytime-serve` process on 127.0.0.1."""

from __future__ import annotations

import io
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models import build_model
from models.artifact import ArchitectureSpec, ExitInfo, InputSpec, ManifestBody, save_artifact
from tools.processes import ROOT, ServerProcess, free_port

__all__ = ["FMNIST_INPUT", "ROOT", "ServerProcess", "free_port", "make_artifact", "metric", "png_bytes"]
FMNIST_INPUT = InputSpec(size=28, channels=1, color_mode="L", resize=None, mean=[0.286], std=[0.353])
RGB_INPUT = InputSpec(size=32, channels=3, color_mode="RGB", resize=None, mean=[0.5] * 3, std=[0.25] * 3)


def require_binary(name: str) -> str:
    """The path of a Debian-packaged program the test needs: fails in CI (where `make test` has
    installed it), skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing; `make test` installs the Debian package")
        pytest.skip(f"{name} is not installed")
    return path


def make_artifact(
    store: Path,
    name: str,
    model_name: str = "test_tiny",
    thresholds: Sequence[float] | None = None,
    stage_ms: Sequence[float] | None = None,
    num_classes: int = 10,
    seed: int = 0,
    profile_ms: Sequence[float] | None = None,
    version: str = "1",
    rgb: bool = False,
    class_prefix: str = "class",
    val_accuracy: Sequence[float] | None = None,
) -> Path:
    """Export an untrained network (same `seed`, same weights) with a hand-made manifest.

    The manifest's latency profile says stage k takes `profile_ms[k]` (default: `stage_ms`, the
    time test_sleepy really sleeps; 1 ms without either). `rgb`: 3-channel 32x32 input instead
    of Fashion-MNIST's 1x28x28. `val_accuracy`: per exit, % (none by default).
    """
    profile_ms = profile_ms or stage_ms
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"stage_ms": list(stage_ms)} if stage_ms else {}
    channels = 3 if rgb else 1
    model = build_model(model_name, num_classes, in_channels=channels, **kwargs).eval()
    n = model.num_exits
    thresholds = list(thresholds) if thresholds is not None else [0.5] * (n - 1) + [0.0]
    exits = []
    for k in range(n):
        ms = profile_ms[k] if profile_ms else 1.0
        latency = {str(bs): {"stage_ms": ms, "head_ms": 0.0} for bs in (1, 8, 32)}
        expected = 0.9 if k < n - 1 else None  # a validation agreement with the final exit, for the drift guard
        exits.append(
            ExitInfo(
                exit=k + 1,
                temperature=1.0,
                threshold=thresholds[k],
                latency_ms=latency,
                expected_agreement=expected,
                val_accuracy=val_accuracy[k] if val_accuracy else None,
            )
        )
    spec = ArchitectureSpec(name=model_name, num_classes=num_classes, in_channels=channels, stem="cifar", kwargs=kwargs)
    body = ManifestBody(
        architecture=spec, classes=[f"{class_prefix}{i}" for i in range(num_classes)],
        input=RGB_INPUT if rgb else FMNIST_INPUT, exits=exits,
    )  # fmt: skip
    return save_artifact(model, body, store, name, version)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def metric(text: str, sample: str, **labels: str) -> float | None:
    """The sum of the samples named `sample` in a /metrics page whose labels include `labels`; None if none."""
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None


def ready_late(response: httpx.Response) -> bool:
    """Whether `response` is the 504 of an answer that was ready only after its deadline (the loop stalled
    across the answer margin): the promise kept by refusing, not a 200 sent late."""
    return response.status_code == 504 and "after the deadline" in response.json()["error"]["message"]


def raw_request(body: bytes, budget_ms: str | None = None, path: str = "/classify", extra: str = "") -> bytes:
    """The bytes of one HTTP/1.1 `POST` of a PNG body (with `X-Deadline-Ms` when `budget_ms` is given, and any
    `extra` header lines), for tests that write to the socket themselves (pipelining, one write for several)."""
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n"
    if budget_ms is not None:
        head += f"X-Deadline-Ms: {budget_ms}\r\n"
    return (head + extra + "\r\n").encode() + body


class HttpReader:
    """HTTP/1.1 responses, one after another, from one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status = int(self.file.readline().split()[1])
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, value = line.decode().split(":", 1)
            headers[name.strip().lower()] = value.strip()
        return status, headers, self.file.read(int(headers["content-length"]))
