"""Several request processes and one engine process behaving as one server (ANYTIME_WORKERS > 1).

```
            ┌─ request process 1: uvicorn + gRPC, decode, validate ─┐
 clients ───┼─ request process 2 ...                                ├─ Unix socket + shared memory ─► engine process
 (one port) └─ request process N ...                                ┘   (registry, one engine per model, batching)
```

The supervisor (this module, the process `anytime-serve` starts) binds the HTTP socket once and
hands it to every request process, so they accept from one queue (a request process that dies
leaves its queued connections to the others); each binds the gRPC port with SO_REUSEPORT. It
starts the engine process, then the request processes, and restarts any of them that dies (the
new one counts itself in `anytime_worker_restarts_total{role}`); request processes reconnect to a
restarted engine process, and answer 503 meanwhile. Readiness: a request process says ready when
the engine process is up and every request process has warmed its request path once. SIGTERM (or
Ctrl-C) to the supervisor drains the request processes with the usual grace period, then the
engine process finishes what they handed it, then everything exits 0: the supervisor tells them
with SIGUSR1, and they ignore SIGTERM and SIGINT, which reach a whole process group at once. If
the supervisor dies, they end too. Metrics: prometheus-client's multiprocess mode over a private
directory (service/metrics.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from service.config import ServiceSettings
from service.drain import DRAIN_SIGNAL

if TYPE_CHECKING:
    from service.metrics import Metrics

log = logging.getLogger("anytime.serve")
START_FAILED = 2  # the engine process's exit code when the models cannot be served


def bind(host: str, port: int) -> socket.socket:
    """The listening HTTP socket every request process accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def request_main(
    settings_json: str, address: str, authkey: bytes, sock: socket.socket, index: int, restarted: bool
) -> None:
    """Entry point of a request process."""
    import uvicorn

    from service.app import build
    from service.drain import DrainingServer
    from service.workers.remote import RemoteRegistry

    orphan_watch()
    settings, metrics = child_setup(settings_json, "request", restarted)
    registry = RemoteRegistry(settings, metrics, address, authkey, index)
    app, stack = build(settings, registry)
    config = uvicorn.Config(
        stack,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        access_log=False,
        http="httptools",
        loop="uvloop",
        proxy_headers=False,
    )
    server = DrainingServer(config, app, settings.drain_grace_s, supervised=True)
    server.run(sockets=[sock])


def engine_main(settings_json: str, address: str, authkey: bytes, expected: int, restarted: bool) -> None:
    """Entry point of the engine process."""
    orphan_watch()
    from service.workers.host import host_main

    host_main(settings_json, address, authkey, expected, restarted)


def child_setup(settings_json: str, role: str, restarted: bool) -> tuple[ServiceSettings, Metrics]:
    """What every child process does first: its settings, logging, torch threads, its metrics (counting
    itself as a restart of `role` when it replaces one that died)."""
    import torch

    from service.metrics import Metrics

    settings = ServiceSettings.model_validate_json(settings_json)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(settings.torch_threads)
    metrics = Metrics()
    if restarted:
        metrics.worker_restarts.labels(role).inc()
    return settings, metrics


def orphan_watch() -> None:
    """End this process if its supervisor dies (SIGKILL leaves no time to stop it): it is reparented."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="anytime-orphan-watch", daemon=True).start()


class Supervisor:
    """Starts, watches, restarts and stops the engine process and the request processes."""

    def __init__(self, settings: ServiceSettings, workers: int) -> None:
        self.settings, self.workers = settings, workers
        self.private = Path(tempfile.mkdtemp(prefix="anytime-serve-"))  # 0700: socket and metrics files
        (self.private / "metrics").mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.private / "metrics")
        os.environ["ANYTIME_INTERNAL_WARMUP_TOKEN"] = secrets.token_hex(16)  # one for the whole server
        self.address = str(self.private / "engine.sock")
        self.authkey = os.urandom(16)
        self.sock = bind(settings.host, settings.port)
        self.ctx = multiprocessing.get_context("spawn")
        self.json = settings.model_dump_json()
        self.engine: BaseProcess | None = None
        self.requests: dict[int, BaseProcess] = {}
        self.stopping = False

    def _engine(self, restarted: bool = False) -> BaseProcess:
        args = (self.json, self.address, self.authkey, self.workers, restarted)
        p = self.ctx.Process(target=engine_main, args=args, name="anytime-engine", daemon=False)
        p.start()
        return p

    def _request(self, index: int, restarted: bool = False) -> BaseProcess:
        args = (self.json, self.address, self.authkey, self.sock, index, restarted)
        p = self.ctx.Process(target=request_main, args=args, name=f"anytime-request-{index}", daemon=False)
        p.start()
        return p

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info("%s: draining %d request processes", signal.Signals(signum).name, len(self.requests))
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.engine = self._engine()
        self.requests = {i: self._request(i) for i in range(self.workers)}
        try:
            return self._watch()
        finally:
            shutil.rmtree(self.private, ignore_errors=True)

    def _watch(self) -> int:
        started = time.monotonic()
        while not self.stopping:
            procs = [self.engine, *self.requests.values()]
            multiprocessing.connection.wait([p.sentinel for p in procs if p is not None], timeout=0.5)
            assert self.engine is not None
            if not self.engine.is_alive() and not self.stopping:
                code = self.engine.exitcode
                if code == START_FAILED and time.monotonic() - started < 600:
                    log.error("the engine process cannot serve (exit %d): stopping", code)
                    self._stop_requests()
                    return START_FAILED
                log.error("the engine process died (exit %s): restarting it", code)
                self._forget(self.engine)
                self.engine = self._engine(restarted=True)
            for index, proc in list(self.requests.items()):
                if not proc.is_alive() and not self.stopping:
                    log.error("request process %d died (exit %s): restarting it", index, proc.exitcode)
                    self._forget(proc)
                    self.requests[index] = self._request(index, restarted=True)
        self._stop_requests()
        assert self.engine is not None
        if self.engine.is_alive() and self.engine.pid is not None:
            os.kill(self.engine.pid, DRAIN_SIGNAL)  # its queued work is answered before it exits
        self.engine.join(self.settings.drain_timeout_s + 10)
        if self.engine.is_alive():
            self.engine.kill()
        return 0

    def _stop_requests(self) -> None:
        """SIGTERM every request process (each drains: grace period, then what it admitted) and wait."""
        for proc in self.requests.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, DRAIN_SIGNAL)
        self.sock.close()  # once the request processes close theirs, connections are refused
        deadline = time.monotonic() + self.settings.drain_grace_s + self.settings.drain_timeout_s + 10
        for proc in self.requests.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()

    def _forget(self, proc: BaseProcess) -> None:
        """A dead process's live gauges stop counting (its counters keep their totals)."""
        from prometheus_client import multiprocess

        if proc.pid is not None:
            multiprocess.mark_process_dead(proc.pid)
