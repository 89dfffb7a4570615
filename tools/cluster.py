"""`make cluster REPLICAS=3`: Anytime replicas behind HAProxy on 127.0.0.1, scraped by Prometheus.

Replica i is `anytime-serve` on 127.0.0.1:(replica_port + i) with the ANYTIME_* settings of the
environment; HAProxy (docker/haproxy/haproxy.cfg) balances them on 127.0.0.1:port by least
outstanding requests, health-checks /readyz and retries a failed connection on another replica;
Prometheus (docker/prometheus/prometheus.yml with local targets) scrapes every replica and
HAProxy. The command runs until Ctrl-C (or `for_s`), restarts a replica that dies, and rolls
every replica one at a time on SIGHUP. Everything binds 127.0.0.1 and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tools.processes import ROOT, LocalProcess, PrometheusProcess, free_port
from tools.settings_cli import settings_from_args

HAPROXY_CONFIG = ROOT / "docker" / "haproxy" / "haproxy.cfg"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
# haproxy.cfg's hard-stop-after: a soft-stopped balancer gives open requests this long.
LB_SOFT_STOP_S = 40.0
log = logging.getLogger("anytime.cluster")


class ClusterSettings(BaseSettings):
    """Settings of `python -m tools.cluster` (flags override ANYTIME_CLUSTER_* variables)."""

    model_config = SettingsConfigDict(env_prefix="ANYTIME_CLUSTER_", extra="ignore")

    replicas: int = Field(3, ge=1, le=16, description="anytime-serve processes")
    port: int = Field(8000, ge=1, le=65535, description="HAProxy's port on 127.0.0.1: where clients connect")
    replica_port: int = Field(8101, ge=0, le=65535, description="first replica's port (then +1 each); 0: free ports")
    stats_port: int = Field(8404, ge=0, le=65535, description="HAProxy's /metrics and /stats; 0: a free port")
    prometheus_port: int = Field(9090, ge=0, le=65535, description="Prometheus scraping the cluster; 0: none")
    scrape_interval_s: float = Field(5.0, gt=0, description="Prometheus scrape interval")
    for_s: float = Field(0.0, ge=0, description="stop after this many seconds; 0: at Ctrl-C")


class Cluster:
    """N replicas, HAProxy and (optionally) Prometheus, all local; use as a context manager.

    `replica_env` adds ANYTIME_* settings for every replica (those of the environment apply too).
    """

    def __init__(self, settings: ClusterSettings, workdir: Path, replica_env: dict[str, str] | None = None) -> None:
        self.settings, self.workdir = settings, workdir
        self.replica_env = {"ANYTIME_HOST": "127.0.0.1", "ANYTIME_GRPC_PORT": "0", **(replica_env or {})}
        base = settings.replica_port
        self.ports = [base + i if base else free_port() for i in range(settings.replicas)]
        self.replicas: list[LocalProcess | None] = [None] * settings.replicas
        self.lb: LocalProcess | None = None
        self.prometheus: PrometheusProcess | None = None
        self.stats_port = settings.stats_port or free_port()
        self.socket_path = workdir / "haproxy.sock"
        self.url = f"http://127.0.0.1:{settings.port}"
        self.starts = 0  # replica processes started so far (each gets its own log)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Cluster:
        """Start every replica (in parallel), then HAProxy, then Prometheus; wait until all serve."""
        for i in range(len(self.ports)):
            self.replicas[i] = self._spawn(i)
        for replica in self.replicas:
            assert replica is not None
            replica.wait_ready()
        self.lb = self._start_haproxy().wait_ready()
        self.wait_lb_status("UP")
        if self.settings.prometheus_port:
            self.prometheus = PrometheusProcess(
                self._prometheus_config(), self.workdir / "tsdb", self.settings.prometheus_port
            ).wait_ready()
            self._wait_scraped()
        return self

    def _wait_scraped(self, timeout_s: float = 60.0) -> None:
        """Wait until Prometheus has scraped every replica and HAProxy successfully once."""
        assert self.prometheus is not None
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            up = self.prometheus.query("sum(up)")
            if up and float(up[0]["value"][1]) == len(self.ports) + 1:
                return
            time.sleep(0.2)
        raise TimeoutError(f"Prometheus did not scrape every target within {timeout_s:.0f} s")

    def stop(self) -> dict[str, int]:
        """Stop the balancer first (no new traffic), then the replicas and Prometheus; exit codes."""
        codes: dict[str, int] = {}
        if self.lb is not None:
            self.lb.signal(signal.SIGUSR1)  # soft stop: close the listener, finish open requests
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.lb.proc.wait(timeout=LB_SOFT_STOP_S)
            codes["haproxy"] = self.lb.stop()
        for replica in self.replicas:  # all drain at once
            if replica is not None:
                replica.terminate()
        for i, replica in enumerate(self.replicas):
            if replica is not None:
                codes[f"replica{i + 1}"] = replica.stop()
        if self.prometheus is not None:
            codes["prometheus"] = self.prometheus.stop()
        return codes

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, i: int) -> LocalProcess:
        self.starts += 1
        env = {**self.replica_env, "ANYTIME_PORT": str(self.ports[i])}
        log_path = self.workdir / f"replica{i + 1}-{self.starts}.log"
        return LocalProcess([sys.executable, "-m", "service.main"], self.ports[i], log_path, env)

    def _start_haproxy(self) -> LocalProcess:
        binary = shutil.which("haproxy")
        if binary is None:
            raise FileNotFoundError("haproxy is not installed (Debian package `haproxy`; `make cluster` installs it)")
        servers = self.workdir / "servers.cfg"
        lines = ["backend api"] + [f"    server r{i + 1} 127.0.0.1:{p} check" for i, p in enumerate(self.ports)]
        servers.write_text("\n".join(lines) + "\n")
        env = {
            "ANYTIME_LB_BIND": f"127.0.0.1:{self.settings.port}",
            "ANYTIME_LB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "ANYTIME_LB_ADMIN_SOCKET": str(self.socket_path),
        }
        argv = [binary, "-db", "-f", str(HAPROXY_CONFIG), "-f", str(servers)]
        return LocalProcess(argv, self.settings.port, self.workdir / "haproxy.log", env)

    def _prometheus_config(self) -> Path:
        """docker/prometheus/prometheus.yml with this cluster's targets instead of compose's DNS names."""
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"]["scrape_interval"] = f"{self.settings.scrape_interval_s:g}s"
        config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config.get("rule_files", [])]
        targets = {"anytime": [f"127.0.0.1:{p}" for p in self.ports], "haproxy": [f"127.0.0.1:{self.stats_port}"]}
        for job in config["scrape_configs"]:
            for key in ("dns_sd_configs", "static_configs"):
                job.pop(key, None)
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # -- operations --------------------------------------------------------------------------
    def replica(self, i: int) -> LocalProcess:
        replica = self.replicas[i]
        assert replica is not None
        return replica

    def restart(self, i: int, timeout_s: float = 120.0) -> int:
        """Replace replica i: SIGTERM (it drains), wait for its exit, start it again, wait until
        HAProxy has it back UP. Returns the old process's exit code."""
        old = self.replica(i)
        old.terminate()
        code = old.proc.wait(timeout=timeout_s)
        old.stop()
        self.start_replica(i, timeout_s)
        return code

    def start_replica(self, i: int, timeout_s: float = 120.0) -> None:
        """Start replica i (whose process has exited) and wait until HAProxy has it UP."""
        self.replicas[i] = self._spawn(i).wait_ready(timeout=timeout_s)
        self.wait_lb_status("UP", [i], timeout_s=timeout_s)

    def rolling_restart(self) -> list[int]:
        """Every replica in turn, one at a time; their exit codes."""
        return [self.restart(i) for i in range(len(self.replicas))]

    def revive_dead(self) -> list[int]:
        """Start again every replica whose process has exited; the indexes restarted."""
        dead = [i for i, r in enumerate(self.replicas) if r is not None and r.proc.poll() is not None]
        for i in dead:
            log.warning("replica %d exited with %s; starting it again", i + 1, self.replica(i).proc.returncode)
            self.replica(i).stop()
            self.start_replica(i)
        return dead

    # -- HAProxy's view ----------------------------------------------------------------------
    def admin(self, command: str) -> str:
        """One command on HAProxy's admin socket (`show stat`, `disable server api/r1`, ...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def lb_servers(self) -> dict[str, dict[str, str]]:
        """HAProxy's statistics row of each replica (`status`: UP, DOWN, ...; `wretr`: retries, ...)."""
        text = self.admin("show stat").lstrip("# ")
        rows = csv.DictReader(line for line in text.splitlines() if line)
        return {r["svname"]: r for r in rows if r["pxname"] == "api" and r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_lb_status(self, status: str, servers: list[int] | None = None, timeout_s: float = 30.0) -> float:
        """Wait until HAProxy reports `status` (UP or DOWN) for replicas `servers` (default all);
        the seconds it took."""
        names = [f"r{i + 1}" for i in (servers if servers is not None else range(len(self.replicas)))]
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            rows = self.lb_servers()
            if all(rows[n]["status"].split()[0] == status for n in names):
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"HAProxy did not report {names} {status} within {timeout_s:.0f} s: {self.lb_servers()}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: start the cluster, keep it running, stop it cleanly."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = settings_from_args(ClusterSettings, argv, "python -m tools.cluster", __doc__.splitlines()[0])
    stop, roll = False, False

    def on_stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    def on_hup(*_: Any) -> None:
        nonlocal roll
        roll = True

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    with tempfile.TemporaryDirectory(prefix="anytime-cluster-") as tmp:
        cluster = Cluster(settings, Path(tmp))
        try:
            cluster.start()
        except (OSError, RuntimeError, TimeoutError) as exc:
            cluster.stop()
            sys.stderr.write(f"cluster: cannot start: {exc}\n")
            return 1
        log.info(
            "balancer %s (stats http://127.0.0.1:%d/stats) over replicas on ports %s; logs in %s",
            cluster.url,
            cluster.stats_port,
            cluster.ports,
            tmp,
        )
        if cluster.prometheus is not None:
            log.info("Prometheus %s", cluster.prometheus.url)
        log.info("Ctrl-C stops everything; kill -HUP %d restarts the replicas one at a time", os.getpid())
        end = time.monotonic() + settings.for_s if settings.for_s else float("inf")
        try:
            while not stop and time.monotonic() < end:
                time.sleep(0.5)
                if roll:
                    roll = False
                    log.info("rolling restart: exit codes %s", cluster.rolling_restart())
                cluster.revive_dead()
        finally:
            codes = cluster.stop()
            log.info("stopped: exit codes %s", codes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
