"""Replicas behind a real HAProxy: balance, drain, rolling restart, SIGKILL, slow clients, Prometheus.

One cluster for the module (tools/cluster.py): three `anytime-serve` replicas of the bundled model,
HAProxy with docker/haproxy/haproxy.cfg, and Prometheus with docker/prometheus/prometheus.yml, all
on 127.0.0.1 and stopped by PID. Load is open-loop Poisson at half the throughput the same client
measured closed-loop through the balancer; every run is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from client import AnytimeError, AsyncAnytimeClient
from client.loadgen import LoadRun, fashion_mnist_pngs
from client.stats import Record, percentile
from models.artifact import read_manifest, resolve_artifact
from tests.helpers import ROOT, free_port, metric, require_binary
from tools.cluster import Cluster, ClusterSettings

pytestmark = pytest.mark.slow
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "anytime.json"
PER_REPLICA_PANELS = {"In flight per replica", "Throughput per replica", "Model", "Event-loop lag", "Resends held"}
REPLICA_ENV = {
    "ANYTIME_MODEL_STORE": str(ROOT / "model_store"), "ANYTIME_MODEL_NAME": "fashion-mnist",
    "ANYTIME_MODEL_POLL_S": "0", "ANYTIME_TORCH_THREADS": "1", "ANYTIME_LOG_LEVEL": "warning",
    # HAProxy takes a replica out after two failed /readyz checks (1 s, then 0.25 s apart).
    "ANYTIME_DRAIN_GRACE_S": "2.5",
}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_binary("haproxy")
    require_binary("prometheus")
    settings = ClusterSettings(
        replicas=3, port=free_port(), replica_port=0, stats_port=0, prometheus_port=free_port(), scrape_interval_s=1
    )
    c = Cluster(settings, tmp_path_factory.mktemp("cluster"), REPLICA_ENV)
    try:
        c.start()
        yield c
    finally:
        codes = c.stop()
    assert all(code == 0 for name, code in codes.items() if name.startswith("replica")), codes


@pytest.fixture(scope="module")
def images() -> list[tuple[bytes, int]]:
    return fashion_mnist_pngs(200)


@dataclass
class Capacity:
    rps: float
    records: list[Record]


@pytest.fixture(scope="module")
def capacity(cluster: Cluster, images: list[tuple[bytes, int]]) -> Capacity:
    """Closed-loop throughput through the balancer (8 clients, 3 s): the load tests run at half of it."""
    run = LoadRun(cluster.url, images, duration_s=3, max_requests=20_000, progress=False)
    duration = asyncio.run(run.closed_loop(8))
    ok = [r for r in run.records if r.status == 200]
    print(f"closed loop through HAProxy: {len(ok) / duration:.0f} requests/s")
    return Capacity(len(ok) / duration, run.records)


def _under_load(cluster: Cluster, images: list, rate: float, duration_s: float, action: Callable[[], Any]) -> tuple:
    """Poisson load at `rate` for at most `duration_s` while `action` runs; stops when `action`
    returns plus 1 s. Returns the load's records and what `action` returned."""
    run = LoadRun(cluster.url, images, duration_s=duration_s, max_requests=int(rate * duration_s) + 1, progress=False)
    thread = threading.Thread(target=lambda: asyncio.run(run.open_loop(rate)), daemon=True)
    thread.start()
    try:
        outcome = action()
        time.sleep(1.0)
    finally:
        run.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
    return run.records, outcome


def _failures(records: list[Record]) -> list[tuple[float, int]]:
    return [(round(r.t, 2), r.status) for r in records if r.status != 200]


def _replica_metrics(cluster: Cluster) -> list[str]:
    return [httpx.get(f"{cluster.replica(i).url}/metrics", timeout=5).text for i in range(len(cluster.replicas))]


def test_traffic_reaches_every_replica_and_prometheus_sums_them(cluster: Cluster, capacity: Capacity) -> None:
    ok = sum(r.status == 200 for r in capacity.records)
    assert ok == len(capacity.records) > 100
    pages = _replica_metrics(cluster)
    answered = [metric(page, "anytime_requests_total", status="200") or 0 for page in pages]
    assert all(n > 0.1 * ok for n in answered), answered  # leastconn spreads 8 clients over 3 replicas
    assert sum(answered) == ok  # each request answered once (no retries at this load)
    num_exits = len(read_manifest(resolve_artifact(ROOT / "model_store", "fashion-mnist")).exits)
    exits = {e: sum(metric(p, "anytime_exits_total", exit=str(e)) or 0 for p in pages) for e in range(1, num_exits + 1)}
    prom = cluster.prometheus
    assert prom is not None

    def scraped_total() -> float:
        result = prom.query('sum(anytime_requests_total{status="200"})')
        return float(result[0]["value"][1]) if result else -1

    end = time.monotonic() + 30
    while scraped_total() != ok and time.monotonic() < end:
        time.sleep(0.5)
    assert scraped_total() == ok
    scraped = prom.query("sum by (exit) (anytime_exits_total)")
    by_exit = {int(r["metric"]["exit"]): float(r["value"][1]) for r in scraped}
    assert by_exit == {e: n for e, n in exits.items() if n}, (by_exit, exits)
    _check_dashboard(prom, len(cluster.replicas))


def _check_dashboard(prom: Any, replicas: int) -> None:
    """Every panel's query returns data; all but the per-replica panels are cluster totals (no
    `instance` label); the per-exit hit rates over all replicas sum to 1."""
    # Version 1 of the bundled model predates the drift guard: its manifest has no expected agreement.
    served = read_manifest(resolve_artifact(ROOT / "model_store", "fashion-mnist"))
    has_expected = any(e.expected_agreement is not None for e in served.exits)
    variables = {"$instance": ".*", "$model": ".*", "$__rate_interval": "30s", "$__range": "5m"}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in variables.items():
                expr = expr.replace(var, value)
            result = prom.query(expr)
            if not has_expected and "anytime_exit_expected_agreement" in expr:
                assert not result
                continue
            assert result, f"panel {panel['title']!r} got no data from: {expr}"
            instances = {r["metric"].get("instance") for r in result}
            if panel["title"] in PER_REPLICA_PANELS:
                assert len(instances) == replicas, (panel["title"], instances)
            else:
                assert instances == {None}, (panel["title"], result)
            if panel["title"] == "Per-exit hit rate":
                assert abs(sum(float(r["value"][1]) for r in result) - 1) < 1e-6
            if panel["title"] == "Balancer" and "active_servers" in expr:
                assert float(result[0]["value"][1]) == replicas


def test_sigterm_under_poisson_load_fails_no_request(cluster: Cluster, capacity: Capacity, images: list) -> None:
    rate = capacity.rps / 2

    def stop_replica() -> tuple[float, int]:
        time.sleep(2)
        replica = cluster.replica(0)
        replica.terminate()
        out_of_pool = cluster.wait_lb_status("DOWN", [0])
        return out_of_pool, replica.proc.wait(timeout=60)

    records, (out_of_pool, code) = _under_load(cluster, images, rate, 30, stop_replica)
    print(f"SIGTERM at {rate:.0f} requests/s: {len(records)} requests, failures {_failures(records)}, "
          f"out of HAProxy's pool after {out_of_pool:.2f} s, exit code {code}")  # fmt: skip
    assert code == 0
    assert not _failures(records)
    assert len(records) > 4 * rate
    cluster.replica(0).stop()
    cluster.start_replica(0)


def test_rolling_restart_under_poisson_load_fails_no_request(
    cluster: Cluster, capacity: Capacity, images: list
) -> None:
    rate = capacity.rps / 2
    records, codes = _under_load(cluster, images, rate, 240, cluster.rolling_restart)
    latencies = [r.latency_ms for r in records if r.status == 200]
    steady = [r.latency_ms for r in capacity.records]
    print(f"rolling restart of {len(codes)} replicas at {rate:.0f} requests/s: {len(records)} requests, "
          f"failures {_failures(records)}; p50 {percentile(latencies, 50):.1f} ms, p99 "
          f"{percentile(latencies, 99):.1f} ms during the rollout (closed loop before: p99 "
          f"{percentile(steady, 99):.1f} ms)")  # fmt: skip
    assert codes == [0] * len(cluster.replicas)
    assert not _failures(records)


def test_sigkill_fails_only_what_retries_recover_and_is_marked_down(cluster: Cluster, capacity: Capacity,
                                                                    images: list) -> None:  # fmt: skip
    rate, deadline_ms = capacity.rps / 2, 2000.0
    before = {name: int(row["wretr"] or 0) + int(row["wredis"] or 0) for name, row in cluster.lb_servers().items()}

    async def load(stop: threading.Event) -> list[tuple[bool, int, str]]:
        rng = random.Random(0)
        outcomes: list[tuple[bool, int, str]] = []

        async def one(client: AsyncAnytimeClient, png: bytes) -> None:
            try:
                result = await client.classify(png, deadline_ms=deadline_ms)
                outcomes.append((True, result.attempts, ""))
            except AnytimeError as exc:
                outcomes.append((False, exc.attempts, f"{type(exc).__name__}: {exc}"))

        async with AsyncAnytimeClient(cluster.url, retries=2) as client:
            tasks, end = [], time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < end and len(tasks) < rate * 60:
                await asyncio.sleep(rng.expovariate(rate))
                tasks.append(asyncio.create_task(one(client, images[len(tasks) % len(images)][0])))
            await asyncio.gather(*tasks)
        return outcomes

    stop = threading.Event()
    result: list[list[tuple[bool, int, str]]] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(load(stop))), daemon=True)
    thread.start()
    try:
        time.sleep(2)
        cluster.replica(1).signal(signal.SIGKILL)
        marked_down = cluster.wait_lb_status("DOWN", [1])
        time.sleep(2)
    finally:
        stop.set()
        thread.join(timeout=60)
    outcomes = result[0]
    after = {name: int(row["wretr"] or 0) + int(row["wredis"] or 0) for name, row in cluster.lb_servers().items()}
    resent = {name: after[name] - before.get(name, 0) for name in after}
    failed = [o for o in outcomes if not o[0]]
    print(f"SIGKILL at {rate:.0f} requests/s: {len(outcomes)} requests, {len(failed)} failed, "
          f"{sum(o[1] > 1 for o in outcomes)} needed a client retry, HAProxy resent {resent}; "
          f"marked DOWN after {marked_down:.2f} s")  # fmt: skip
    assert not failed, failed
    assert marked_down < 5  # fall 2: one check at the 1 s interval, one 0.25 s later, plus the check's timeout
    cluster.replica(1).stop()
    cluster.start_replica(1)


def test_balancer_cuts_clients_that_never_finish_their_header(cluster: Cluster) -> None:
    """The 'slowloris' shield: partial request headers are answered 408 and closed after HAProxy's
    `timeout http-request` (5 s), and the replicas stay responsive meanwhile."""
    port = int(cluster.url.rsplit(":", 1)[1])
    sockets = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n")
            sockets.append(s)
        opened = time.monotonic()
        health = []
        for _ in range(10):
            start = time.perf_counter()
            assert httpx.get(f"{cluster.url}/healthz", timeout=5).status_code == 200
            health.append((time.perf_counter() - start) * 1e3)
        open_ = set(range(len(sockets)))
        answers: dict[int, bytes] = {}
        while open_ and time.monotonic() - opened < 12:
            readable, _, _ = select.select([sockets[i] for i in open_], [], [], 0.5)
            for s in readable:
                i = sockets.index(s)
                data = s.recv(4096)
                answers[i] = answers.get(i, b"") + data
                if not data:
                    open_.discard(i)
        cut_after = time.monotonic() - opened
    finally:
        for s in sockets:
            s.close()
    print(f"300 partial headers: all closed by HAProxy after {cut_after:.1f} s; /healthz meanwhile "
          f"max {max(health):.1f} ms")  # fmt: skip
    assert not open_
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers.values())


def test_cluster_command_serves_and_stops_cleanly_on_ctrl_c(tmp_path: Path, images: list) -> None:
    """`python -m tools.cluster`, as `make cluster` runs it: serves through the balancer, and
    SIGINT (Ctrl-C) stops the balancer and the replicas, every one with exit code 0."""
    port = free_port()
    args = ["--replicas", "1", "--port", str(port), "--replica-port", "0", "--stats-port", "0",
            "--prometheus-port", "0", "--for-s", "300"]  # fmt: skip
    log = tmp_path / "cluster.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tools.cluster", *args], cwd=ROOT,
                                env={**os.environ, **REPLICA_ENV}, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        end = time.monotonic() + 120
        while "balancer http://" not in log.read_text() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/classify", content=images[0][0],
                       headers={"content-type": "image/png"}, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped: exit codes {'haproxy': 0, 'replica1': 0}" in log.read_text(), log.read_text()[-3000:]
