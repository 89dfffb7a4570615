"""Test helpers: small artifacts made on the spot, and a real `anytime-serve` process on 127.0.0.1."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from models import build_model
from models.artifact import save_artifact

ROOT = Path(__file__).resolve().parents[1]
FMNIST_INPUT = {"size": 28, "channels": 1, "color_mode": "L", "resize": None, "mean": [0.286], "std": [0.353]}


def make_artifact(
    store: Path,
    name: str,
    model_name: str = "test_tiny",
    thresholds: Sequence[float] | None = None,
    stage_ms: Sequence[float] | None = None,
    num_classes: int = 10,
    seed: int = 0,
    profile_ms: Sequence[float] | None = None,
) -> Path:
    """Export an untrained network (same `seed`, same weights) with a hand-made manifest.

    The manifest's latency profile says stage k takes `profile_ms[k]` (default: `stage_ms`, the
    time test_sleepy really sleeps; 1 ms without either).
    """
    profile_ms = profile_ms or stage_ms
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"stage_ms": list(stage_ms)} if stage_ms else {}
    model = build_model(model_name, num_classes, in_channels=1, **kwargs).eval()
    n = model.num_exits
    thresholds = list(thresholds) if thresholds is not None else [0.5] * (n - 1) + [0.0]
    exits = []
    for k in range(n):
        ms = profile_ms[k] if profile_ms else 1.0
        latency = {str(bs): {"stage_ms": ms, "head_ms": 0.0} for bs in (1, 8, 32)}
        exits.append({"exit": k + 1, "temperature": 1.0, "threshold": thresholds[k], "latency_ms": latency})
    spec = {"name": model_name, "num_classes": num_classes, "in_channels": 1, "stem": "cifar", "kwargs": kwargs}
    manifest = {"architecture": spec, "classes": [f"class{i}" for i in range(num_classes)], "input": FMNIST_INPUT,
                "exits": exits, "policy": {"confidence": "max_softmax"}}  # fmt: skip
    return save_artifact(model, manifest, store, name, "1")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`anytime-serve` in a subprocess on 127.0.0.1, started and stopped by PID."""

    def __init__(self, store: Path, name: str, **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ANYTIME_MODEL_STORE": str(store), "ANYTIME_MODEL_NAME": name,
               "ANYTIME_HOST": "127.0.0.1", "ANYTIME_PORT": str(self.port), "ANYTIME_TORCH_THREADS": "1",
               "ANYTIME_LOG_LEVEL": "warning"}  # fmt: skip
        env.update({f"ANYTIME_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = open(store / f"server-{self.port}.log", "w+")  # noqa: SIM115 - closed in stop()
        self.terminated = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.app"], env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def terminate(self) -> None:
        """Send SIGTERM once (a second one could land while the interpreter is exiting)."""
        if self.proc.poll() is None and not self.terminated:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        self.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code
