"""Local server processes for tests and benchmarks: a free loopback port, start, wait, stop by PID.

Every process binds 127.0.0.1, runs in its own process group (so a server that starts children,
like TorchServe's JVM, is stopped as a whole) and is stopped with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalProcess:
    """A server process on 127.0.0.1:`port`, logging to `log_path`, started and stopped by PID.

    `cpus` (e.g. "0") pins it, and every process it starts, to those cores with `taskset`.
    """

    def __init__(
        self, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None, cpus: str | None = None
    ) -> None:
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        self.argv, self.port = argv, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w+")  # closed in stop()
        self.terminated = False
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by every live process of its process group (a server's
        workers too), all threads, from /proc."""
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            if int(fields[2]) == self.proc.pid:  # its process group: started with start_new_session
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def wait_ready(self, path: str = "/readyz", timeout: float = 120.0) -> LocalProcess:
        """Poll `path` until it answers 200; raise (after stopping the process) if it dies or times out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:3]} exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.argv[:3]} not ready in {timeout:.0f} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def signal(self, sig: int) -> None:
        """Send `sig` to the process group (nothing if it is gone)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        """Send SIGTERM once (a second one could land while the interpreter is exiting)."""
        if self.proc.poll() is None and not self.terminated:
            self.terminated = True
            self.signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, SIGKILL after `timeout` s, and SIGKILL to children that outlived it; the exit code."""
        self.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.proc.wait()
        self.signal(signal.SIGKILL)
        self.log.close()
        return code


class ServerProcess(LocalProcess):
    """`anytime-serve` (python -m service.main) serving `name` from `store`; `settings` become ANYTIME_*.

    gRPC is off unless `grpc_port` is given (several test servers must not contend for 8001), and
    there is no drain grace period unless `drain_grace_s` is given (no balancer needs one).
    """

    def __init__(
        self, store: Path, name: str, log_dir: Path | None = None, cpus: str | None = None, **settings: Any
    ) -> None:
        port = free_port()
        env = {
            # The project first; an inherited path stays (packages installed beside the interpreter's).
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "ANYTIME_MODEL_STORE": str(store),
            "ANYTIME_MODEL_NAME": name,
            "ANYTIME_HOST": "127.0.0.1",
            "ANYTIME_PORT": str(port),
            "ANYTIME_TORCH_THREADS": "1",
            "ANYTIME_LOG_LEVEL": "warning",
            "ANYTIME_GRPC_PORT": "0",
            "ANYTIME_DRAIN_GRACE_S": "0",
        }
        env.update({f"ANYTIME_{k.upper()}": str(v) for k, v in settings.items()})
        self.grpc_address = f"127.0.0.1:{settings['grpc_port']}" if settings.get("grpc_port") else None
        log_path = Path(log_dir or store) / f"server-{port}.log"
        super().__init__([sys.executable, "-m", "service.main"], port, log_path, env, cpus)


class PrometheusProcess(LocalProcess):
    """Debian's `prometheus` with `config` on 127.0.0.1:`port` (a free one when None), data in `data_dir`."""

    def __init__(self, config: Path, data_dir: Path, port: int | None = None) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (Debian package `prometheus`)")
        port = port or free_port()
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        super().__init__(argv, port, data_dir.parent / f"prometheus-{port}.log")

    def wait_ready(self, path: str = "/-/ready", timeout: float = 60.0) -> PrometheusProcess:
        super().wait_ready(path, timeout)
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (raises on a query error)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]
