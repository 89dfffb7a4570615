"""Load from wrk (a compiled load generator, Debian's `wrk`) with bench/lua/anytime.lua.

wrk is pinned to its own core; one run is bounded by `seconds` and stops by itself. A run
returns what wrk measured (latency percentiles at microsecond resolution, throughput) and what
the script read from the answers (statuses, exits, server-side latency against the deadline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent / "lua" / "anytime.lua"


@dataclass(frozen=True)
class WrkResult:
    """One wrk run."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    status: dict[str, int]
    exits: dict[str, int]
    ok: int
    server_met: int  # answers whose server-side latency_ms is within the deadline
    early_by_deadline: int  # answers with reason "deadline"
    share_under_deadline: float  # share of responses (any status) within the deadline, client side
    socket_errors: int

    @property
    def throughput(self) -> float:
        """Answers with status 200 per second."""
        return self.ok / self.seconds

    def client_attainment(self) -> float:
        """Share of requests answered 200 within the deadline as the client saw it.

        wrk's histogram counts every response; non-200 answers (504s are answered at once) are
        taken as under the deadline and subtracted, which can only understate attainment.
        """
        total = self.requests + self.socket_errors
        return max(0.0, self.share_under_deadline * self.requests - (self.requests - self.ok)) / max(total, 1)

    def server_attainment(self) -> float:
        """Share of requests answered 200 with a server-side latency within the deadline."""
        return self.server_met / max(self.requests + self.socket_errors, 1)


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("make bench needs wrk (Debian package `wrk`): apt-get install wrk")
    return path


def _wrk(
    script: Path,
    url: str,
    seconds: float,
    threads: int,
    connections: int,
    timeout: str,
    env: dict[str, str],
    lists: dict[str, Sequence[object]],
    cpu: int | None,
) -> dict[str, Any]:
    """Run wrk with `script` for `seconds` (loopback only) and return the JSON its done() printed; each of
    `lists` goes to the script as a file of lines named by that environment variable."""
    if not url.startswith(("http://127.", "http://localhost")):
        raise ValueError(f"benchmarks stay on this machine; refusing {url}")
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        files = {}
        for name, items in lists.items():
            path = Path(tmp) / name.lower()
            path.write_text("\n".join(str(x) for x in items) + "\n")
            files[name] = str(path)
        argv = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
        argv += ["--timeout", timeout, "-s", str(script), url]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        run_env = {**os.environ, **env, **files}
        out = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr[-2000:]}{out.stdout[-2000:]}")
    return json.loads(line.removeprefix("BENCH_JSON "))


def run_wrk(
    url: str,
    images: list[Path],
    seconds: float,
    connections: int,
    *,
    paths: list[str] | None = None,
    rate: float | None = None,
    deadline_ms: float | None = None,
    cpu: int | None = None,
    content_type: str = "image/png",
    header: str | None = None,
) -> WrkResult:
    """One bounded wrk run against `url` (loopback only) with the given images and request paths."""
    env = {"BENCH_CONTENT_TYPE": content_type, "BENCH_CONNECTIONS": str(connections)}
    if rate:
        env["BENCH_RATE"] = f"{rate:.3f}"
    if deadline_ms is not None:
        env["BENCH_DEADLINE_MS"] = f"{deadline_ms:g}"
    if header is not None:
        env["BENCH_HEADER"] = header
    lists = {"BENCH_IMAGES": images, "BENCH_PATHS": paths or ["/classify"]}
    raw = _wrk(SCRIPT, url, seconds, 1, connections, "30s", env, lists, cpu)
    errors = raw["errors"]
    return WrkResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1e3,
        p90_ms=raw["p90_us"] / 1e3,
        p99_ms=raw["p99_us"] / 1e3,
        status=raw["status"],
        exits=raw["exits"],
        ok=raw["ok"],
        server_met=raw["server_met"],
        early_by_deadline=raw["early_by_deadline"],
        share_under_deadline=raw["share_under_deadline"],
        socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
    )


DEADLINES_SCRIPT = Path(__file__).resolve().parent / "lua" / "deadlines.lua"


@dataclass(frozen=True)
class DeadlineRun:
    """One Poisson run with a deadline, every request timed on the client (bench/lua/deadlines.lua)."""

    requests: int
    seconds: float
    ok: int
    in_time: int  # 200 within the deadline, client side
    server_in_time: int  # 200 whose server-side latency is within the deadline
    correct: int  # 200 with the right label
    refused: int  # 503 and 504
    refused_fast: int  # refusals that came within 2 ms
    late_504: int
    other: int
    early: int  # answers with reason "deadline"
    socket_errors: int
    refused_max_ms: float
    answer_max_ms: float
    exits: dict[str, int]
    late_1ms: int = 0  # 200s more than 1 ms after their deadline, client side

    @property
    def offered_rps(self) -> float:
        return (self.requests + self.socket_errors) / self.seconds

    @property
    def client_attainment(self) -> float:
        return self.in_time / max(self.requests + self.socket_errors, 1)

    @property
    def server_attainment(self) -> float:
        return self.server_in_time / max(self.requests + self.socket_errors, 1)

    @property
    def goodput_rps(self) -> float:
        """Answers within their deadline per second."""
        return self.in_time / self.seconds

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.ok, 1)


def run_deadlines(
    url: str,
    images: list[Path],
    labels: list[int],
    seconds: float,
    rate: float,
    deadline_ms: float,
    cpu: int | None = None,
    path: str = "/classify",
    connections: int | None = None,
) -> DeadlineRun:
    """Poisson arrivals at `rate` with `deadline_ms`, one wrk thread per connection (enough connections that
    each waits about 100 ms between its requests, so that slow answers barely slow the arrivals). With
    `rate` 0, `connections` clients that each send again as soon as they have an answer: the same image
    after a refusal (a retry loop without backoff), the next after a 200."""
    if connections is None:
        connections = max(16, min(512, round(rate * 0.1)))
    env = {"BENCH_RATE": f"{rate:.3f}", "BENCH_CONNECTIONS": str(connections), "BENCH_DEADLINE_MS": f"{deadline_ms:g}"}
    env["BENCH_PATH"] = path
    lists = {"BENCH_IMAGES": images, "BENCH_LABELS": labels}
    raw = _wrk(DEADLINES_SCRIPT, url, seconds, connections, connections, "10s", env, lists, cpu)
    return DeadlineRun(
        requests=raw["n"],
        seconds=raw["duration_us"] / 1e6,
        ok=raw["ok"],
        in_time=raw["in_time"],
        server_in_time=raw["server_in_time"],
        correct=raw["correct"],
        refused=raw["refused"],
        refused_fast=raw["refused_fast"],
        late_504=raw["late_504"],
        other=raw["other"],
        early=raw["early"],
        socket_errors=raw["socket_errors"],
        refused_max_ms=raw["refused_max_ms"],
        answer_max_ms=raw["answer_max_ms"],
        exits=raw["exits"],
        late_1ms=raw["late_1ms"],
    )
