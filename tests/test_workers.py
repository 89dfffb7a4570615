"""Several request processes in front of one engine process (ANYTIME_WORKERS=2), as one server: they
share one port and one engine, metrics add up over them, a killed one is replaced while the server
stays ready, and SIGTERM under load loses nothing."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from client import AnytimeClient, Unreachable
from tests.helpers import ServerProcess, make_artifact, metric, png_bytes

PNG = png_bytes(Image.new("L", (28, 28), 90))
POST = {"content": PNG, "headers": {"content-type": "image/png"}}


def _listening_inode(port: int) -> str:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                return fields[9]
    raise AssertionError(f"nothing listens on {port}")


def request_processes(server: ServerProcess) -> list[int]:
    """PIDs of the server's request processes: its processes that hold the listening socket, but the supervisor."""
    target = f"socket:[{_listening_inode(server.port)}]"
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != server.pid:  # its process group
                continue
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return sorted(p for p in pids if p != server.pid)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("workers")
    make_artifact(store, "tiny", "test_tiny")
    return store


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(store, "tiny", workers=2).wait_ready(timeout=180)
    yield srv
    assert srv.stop() == 0


def _burst(url: str, count: int, threads: int = 8, **params: object) -> list[int]:
    codes: list[int] = []

    def run() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(count // threads):
                codes.append(client.post("/classify", params=params, **POST).status_code)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return codes


def test_two_request_processes_answer_on_one_port_and_the_metrics_add_up(server: ServerProcess) -> None:
    assert len(request_processes(server)) == 2
    before = httpx.get(f"{server.url}/metrics").text
    codes = _burst(server.url, 400) + _burst(server.url, 40, max_exit=99)  # 400 answers, 40 refused (422)
    assert codes.count(200) == 400 and codes.count(422) == 40
    text = httpx.get(f"{server.url}/metrics").text

    def count(page: str, status: str) -> float:
        return metric(page, "anytime_requests_total", status=status) or 0

    counted = {s: count(text, s) - count(before, s) for s in ("200", "422")}
    assert counted == {"200": 400, "422": 40}
    per_worker = [metric(text, "anytime_worker_requests_total", worker=w) or 0 for w in ("0", "1")]
    assert sum(per_worker) >= 440 and min(per_worker) > 0, per_worker  # both processes took requests
    assert metric(text, "anytime_exits_total") >= 400  # counted by the request processes
    assert metric(text, "anytime_stage_seconds_count") > 0  # counted by the engine process
    assert metric(text, "anytime_model_info", name="tiny", version="1") == 1
    assert httpx.get(f"{server.url}/v1/model").json()["stage_ms_now"]  # the engine process's live figures


def test_a_killed_request_process_is_replaced_and_the_server_stays_ready(store: Path) -> None:
    """While the new request process warms its socket it already takes connections: /readyz, asked on
    new connections from four threads all along, never says 503 (one did, 50-140 times a restart)."""
    srv = ServerProcess(store, "tiny", workers=2).wait_ready(timeout=180)
    statuses: list[int] = []
    stop = threading.Event()

    def poll_readiness() -> None:
        with httpx.Client(base_url=srv.url, timeout=5, headers={"connection": "close"}) as client:
            while not stop.is_set():
                statuses.append(client.get("/readyz").status_code)

    pollers = [threading.Thread(target=poll_readiness) for _ in range(4)]
    try:
        victim = request_processes(srv)[0]
        os.kill(victim, signal.SIGKILL)
        for t in pollers:
            t.start()
        end = time.monotonic() + 20
        while time.monotonic() < end:
            assert httpx.post(f"{srv.url}/classify", timeout=10, **POST).status_code == 200
            pids = request_processes(srv)
            if len(pids) == 2 and victim not in pids:
                text = httpx.get(f"{srv.url}/metrics").text
                if metric(text, "anytime_worker_restarts_total", role="request") == 1:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the killed request process was not replaced in 20 s")
        time.sleep(1.0)  # past the new process's warm-up over the socket
        stop.set()
        for t in pollers:
            t.join()
        assert len(statuses) > 100 and set(statuses) == {200}, collections.Counter(statuses)
    finally:
        stop.set()
        assert srv.stop() == 0


def test_sigterm_under_load_loses_nothing(store: Path) -> None:
    """Clients keep sending through SIGTERM: every request is answered, or (once the listener is closed)
    refused at connect; nothing fails in between."""
    srv = ServerProcess(store, "tiny", workers=2, drain_grace_s=1).wait_ready(timeout=180)
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        with AnytimeClient(srv.url, retries=2, retry_backoff_ms=20, timeout_s=10) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    c.classify(PNG)
                    outcomes.append((sent, "200"))
                except Unreachable:
                    outcomes.append((sent, "refused"))
                except Exception as exc:  # anything else is a lost request
                    outcomes.append((sent, f"{type(exc).__name__}: {exc}"))
                if outcomes[-1][1] == "refused":
                    time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    signalled = time.monotonic()
    srv.terminate()
    code = srv.proc.wait(timeout=60)
    stop.set()
    for t in threads:
        t.join()
    srv.stop()
    kinds = {kind for _, kind in outcomes}
    print(f"{len(outcomes)} requests: {sorted(kinds)}")
    assert code == 0, srv.output()[-3000:]
    assert kinds <= {"200", "refused"}, kinds
    assert all(kind == "200" for sent, kind in outcomes if sent < signalled + 0.8)  # within the grace period
    assert sum(kind == "200" for _, kind in outcomes) > 50
