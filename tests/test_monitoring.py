"""The Grafana dashboard proven against a real Prometheus scraping a real server.

Traffic exercises every exit and every deadline outcome; then every panel's PromQL (template
variables substituted) must return data through Prometheus's HTTP API. Both processes bind
127.0.0.1 and are stopped by PID.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.engine.timing import STALE_S
from tests.helpers import ROOT, ServerProcess, make_artifact, metric, png_bytes, require_binary
from tools.processes import PrometheusProcess

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "anytime.json"
VARIABLES = {"$instance": ".*", "$model": ".*", "$__rate_interval": "30s", "$__range": "5m"}


def prometheus_process(config: Path, data_dir: Path) -> PrometheusProcess:
    """A real Prometheus on 127.0.0.1; fails in CI (skips elsewhere) when the Debian package is missing."""
    require_binary("prometheus")
    return PrometheusProcess(config, data_dir).wait_ready()


@pytest.fixture()
def prometheus(tmp_path: Path) -> Iterator[tuple[ServerProcess, PrometheusProcess]]:
    # Stages really take 40 ms; the manifest claims 2 ms, so a deadline request is answered at its deadline.
    # Exit 1 answers every request without a threshold of its own, and each such answer is shadow-checked.
    make_artifact(tmp_path, "sleepy", "test_sleepy", [0.0, 1.0, 1.0, 0.0], stage_ms=[40] * 4, profile_ms=[2] * 4)
    server = ServerProcess(tmp_path, "sleepy", warmup="false", max_wait_ms=0, shadow_rate=1).wait_ready()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: anytime\n    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    try:
        prom = prometheus_process(config, tmp_path / "tsdb")
    except BaseException:
        server.stop()
        raise
    try:
        yield server, prom
    finally:
        prom.stop()
        assert server.stop() == 0


def _wait(check, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("condition not met in time")


def _traffic(url: str, png: bytes) -> dict[str, int]:
    seen: dict[str, int] = {}

    def ask(deadline_ms: float | None = None, **params: object) -> None:
        headers = {"content-type": "image/png"}
        if deadline_ms is not None:
            headers["x-deadline-ms"] = str(deadline_ms)
        r = httpx.post(f"{url}/classify", content=png, headers=headers, params=params, timeout=30)
        key = str(r.status_code) if r.status_code != 200 else f"exit{r.json()['exit']}-{r.json()['reason']}"
        seen[key] = seen.get(key, 0) + 1

    ask(1, threshold=1)  # cannot reach exit 1: rejected
    end = time.monotonic() + 6
    while time.monotonic() < end:  # several scrapes' worth of every exit
        ask(10_000)
        ask(max_exit=2, threshold=1)
        ask(max_exit=3, threshold=1)
        ask(threshold=1)
    # Predicted 2 ms per stage (the manifest's figure, which the estimates fall back to after STALE_S
    # idle), really 40: stage 2 starts and is still running at 60 ms, so the answer comes from exit 1
    # at the deadline (reason deadline). It leaves an answer margin early, so it is met: a late
    # answer ("missed") now takes an event loop stalled past the margin (tests/test_deadlines.py).
    time.sleep(STALE_S + 0.2)
    ask(60, threshold=1)
    return seen


@pytest.mark.slow
def test_every_dashboard_panel_returns_data(prometheus: tuple[ServerProcess, PrometheusProcess]) -> None:
    server, prom = prometheus
    seen = _traffic(server.url, png_bytes(Image.new("L", (28, 28), 128)))
    assert {"504", "exit1-confidence", "exit2-max_exit", "exit3-max_exit", "exit4-final"} <= set(seen), seen
    metrics = httpx.get(f"{server.url}/metrics").text
    for outcome in ("met", "rejected"):
        assert metric(metrics, "anytime_deadline_total", model="sleepy", version="1", outcome=outcome), outcome
    assert metric(metrics, "anytime_deadline_total", model="sleepy", version="1", outcome="missed") is not None
    dashboard = json.loads(DASHBOARD.read_text())

    query = prom.query
    _wait(lambda: len(query("anytime_exits_total")) >= 4 and len(query("anytime_deadline_total")) == 3, 30)
    time.sleep(2)  # one more scrape after the last request
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            if "haproxy_" in expr:  # the balancer's series: tests/test_cluster.py
                continue
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            result = query(expr)
            assert result, f"panel {panel['title']!r} got no data from: {expr}"
    hit = query(
        "sum by (exit) (rate(anytime_exits_total[30s])) / ignoring(exit) group_left sum(rate(anytime_exits_total[30s]))"
    )
    assert {r["metric"]["exit"] for r in hit} == {"1", "2", "3", "4"}
    assert abs(sum(float(r["value"][1]) for r in hit) - 1.0) < 1e-6
