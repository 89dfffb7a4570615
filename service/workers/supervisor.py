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
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from service.config import ServiceSettings
from service.drain import DRAIN_SIGNAL
from service.exits import CANNOT_SERVE, OK
from service.workers.children import engine_main, request_main

log = logging.getLogger("anytime.serve")
# An engine process that exits CANNOT_SERVE this soon after the start stops the server instead of
# restarting: its models cannot be served. Later (a store changed under a running server) it restarts.
START_WINDOW_S = 600.0
BACKLOG = 2048  # the shared HTTP socket's accept queue (every request process accepts from it)
WATCH_S = 0.5  # how often the supervisor looks at its children when none exits and no signal comes
EXIT_SLACK_S = 10.0  # past its grace period and drain timeout, how long a child gets to exit before SIGKILL


def bind(host: str, port: int) -> socket.socket:
    """The listening HTTP socket every request process accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


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
        # The children see how many request processes there are (0, the default, is resolved by then).
        self.json = settings.model_copy(update={"workers": workers}).model_dump_json()
        self.engine: BaseProcess | None = None
        self.requests: dict[int, BaseProcess] = {}
        self.stopping = False
        # The signal handler writes here so the watch wakes at once: a request process told to drain
        # half a watch late would answer on a listener the client was told is closing.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

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
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:  # the pipe is full of earlier wake-ups: the watch wakes anyway
            pass

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.engine = self._engine()
        self.requests = {i: self._request(i) for i in range(self.workers)}
        try:
            return self._watch()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):  # nothing left to wake: no write to a closed pipe
                signal.signal(sig, lambda *_: None)
            os.close(self.wake_r)
            os.close(self.wake_w)
            shutil.rmtree(self.private, ignore_errors=True)

    def _watch(self) -> int:
        started = time.monotonic()
        while not self.stopping:
            procs = [self.engine, *self.requests.values()]
            sentinels = [p.sentinel for p in procs if p is not None]
            multiprocessing.connection.wait([*sentinels, self.wake_r], timeout=WATCH_S)
            assert self.engine is not None
            if not self.engine.is_alive() and not self.stopping:
                code = self.engine.exitcode
                if code == CANNOT_SERVE and time.monotonic() - started < START_WINDOW_S:
                    log.error("the engine process cannot serve (exit %d): stopping", code)
                    self._stop_requests()
                    return CANNOT_SERVE
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
        self.engine.join(self.settings.drain_timeout_s + EXIT_SLACK_S)
        if self.engine.is_alive():
            self.engine.kill()
        return OK

    def _stop_requests(self) -> None:
        """SIGTERM every request process (each drains: grace period, then what it admitted) and wait."""
        for proc in self.requests.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, DRAIN_SIGNAL)
        self.sock.close()  # once the request processes close theirs, connections are refused
        deadline = time.monotonic() + self.settings.drain_grace_s + self.settings.drain_timeout_s + EXIT_SLACK_S
        for proc in self.requests.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()

    def _forget(self, proc: BaseProcess) -> None:
        """A dead process's live gauges stop counting (its counters keep their totals)."""
        from prometheus_client import multiprocess

        if proc.pid is not None:
            multiprocess.mark_process_dead(proc.pid)
