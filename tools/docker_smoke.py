"""`make docker-smoke`: build the images and run them, on this machine, with a real Docker engine.

Steps (each bounded in time; everything it creates is removed at the end, the engine too when
this command started it):

1. a Docker engine: the one DOCKER_HOST (or the default socket) reaches, else `dockerd` started on
   a socket, data root and exec root in a temporary directory, with no bridge and no iptables
   (every container here uses the host network and binds 127.0.0.1);
2. base images: pulled, or when no registry answers, stand-ins built from Debian bookworm with
   debootstrap and tagged with the base's name (`python:3.11-slim` with python and pip on PATH,
   `prom/prometheus` from Debian's prometheus package);
3. a wheelhouse prepared on the host (`pip download`) and served on 127.0.0.1 when the build
   cannot reach a package index: the Dockerfiles take it through build arguments;
4. `serve` and `train` of docker/Dockerfile built (docker/Dockerfile.cuda too when its base can be
   pulled), their sizes reported;
5. the api image run read-only as its non-root user: Docker's HEALTHCHECK turns healthy,
   /classify answers a PNG, /metrics answers, `docker stop` drains and exits 0;
6. the train image trains one short epoch on Fashion-MNIST mounted read-only and exports into a
   volume, and a fresh api container serves that version from the volume;
7. `docker-compose up` of api and prometheus from docker-compose.yml adapted to this machine (host
   network, so no published ports; local images), and Prometheus scraping the api (`up == 1`,
   `anytime_requests_total` present). HAProxy (`lb`) needs Docker's DNS, which only bridge
   networks have, and no Grafana image can be had here: both are left out.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tools.processes import ROOT, LocalProcess, free_port
from tools.settings_cli import settings_from_args

log = logging.getLogger("anytime.docker_smoke")
PYTHON_BASE = "python:3.11-slim"
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
CUDA_BASE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
DEBIAN_PACKAGES = "python3,python3-venv,prometheus,wget,ca-certificates"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PREFIX = "anytime-smoke"


class SmokeSettings(BaseSettings):
    """Settings of `python -m tools.docker_smoke` (flags override ANYTIME_SMOKE_* variables)."""

    model_config = SettingsConfigDict(env_prefix="ANYTIME_SMOKE_", extra="ignore")

    storage_driver: str = Field("overlay2", description="for an engine this command starts (vfs if overlay2 fails)")
    api_port: int = Field(8000, ge=1, le=65535, description="the api container's port on 127.0.0.1")
    prometheus_port: int = Field(9090, ge=1, le=65535, description="compose Prometheus's port on 127.0.0.1")
    mirror: str = Field("http://deb.debian.org/debian", description="Debian mirror for the stand-in bases")
    keep: bool = Field(False, description="keep the images built (the engine and containers still go)")


class SmokeFailed(RuntimeError):
    """A check failed: the message says which and what was seen."""


def run(argv: list[str], timeout: float = 600, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
    """Run a command, capture its output, raise SmokeFailed with its tail when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise SmokeFailed(f"{' '.join(argv[:6])} … exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


class Engine:
    """A Docker engine to talk to: an existing one, or dockerd started here (and stopped in close())."""

    def __init__(self, workdir: Path, storage_driver: str) -> None:
        self.workdir, self.storage_driver = workdir, storage_driver
        self.daemon: subprocess.Popen | None = None
        self.env = dict(os.environ)

    def docker(self, *args: str, timeout: float = 600, check: bool = True, **kw: object) -> subprocess.CompletedProcess:
        return run(["docker", *args], timeout=timeout, check=check, env=self.env, **kw)

    def start(self) -> Engine:
        if run(["docker", "info"], timeout=30, check=False).returncode == 0:
            log.info("using the running Docker engine")
            return self
        for driver in dict.fromkeys([self.storage_driver, "vfs"]):
            if self._start_daemon(driver):
                return self
        raise SmokeFailed(f"dockerd did not start; its log: {self.workdir / 'dockerd.log'}")

    def _start_daemon(self, driver: str) -> bool:
        root = self.workdir / f"engine-{driver}"
        root.mkdir()
        sock = root / "docker.sock"
        argv = [
            "dockerd",
            f"--storage-driver={driver}",
            "--iptables=false",
            "--bridge=none",
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'exec'}",
            f"--pidfile={root / 'pid'}",
            f"--host=unix://{sock}",
        ]
        with (self.workdir / "dockerd.log").open("a") as out:
            self.daemon = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
        end = time.monotonic() + 60
        while time.monotonic() < end and self.daemon.poll() is None:
            if self.docker("info", timeout=10, check=False).returncode == 0:
                probe = self.docker("info", "--format", "{{.Driver}}", timeout=10, check=False).stdout.strip()
                log.info("started dockerd (%s storage) in %s", probe, root)
                self.data_root = root / "data"
                return True
            time.sleep(0.5)
        self.close()
        return False

    def disk_used(self) -> str:
        root = getattr(self, "data_root", None)
        if root is None:
            return self.docker("system", "df", check=False).stdout
        return run(["du", "-sh", str(root)], check=False).stdout.split("\t")[0]

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None


class Smoke:
    """The steps of the module docstring, with everything they create recorded for clean-up."""

    def __init__(self, settings: SmokeSettings, workdir: Path) -> None:
        self.settings, self.workdir = settings, workdir
        self.engine = Engine(workdir, settings.storage_driver)
        self.images: list[str] = []
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self.report: dict[str, object] = {}
        self.wheel_server: LocalProcess | None = None
        self.build_args: list[str] = []

    # -- bases ------------------------------------------------------------------------------
    def _pull(self, image: str) -> bool:
        if self.engine.docker("image", "inspect", image, check=False, timeout=30).returncode == 0:
            return True
        return self.engine.docker("pull", image, check=False, timeout=120).returncode == 0

    def _rootfs(self) -> Path:
        rootfs = self.workdir / "rootfs"
        if not rootfs.exists():
            log.info("debootstrap bookworm with %s", DEBIAN_PACKAGES)
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={DEBIAN_PACKAGES}",
                    "bookworm",
                    str(rootfs),
                    self.settings.mirror,
                ],
                timeout=900,
            )
            # python:3.11-slim has `python` and `pip` on PATH and pip may install: a venv gives both.
            run(["chroot", str(rootfs), "python3", "-m", "venv", "/usr/local/python"], timeout=300)
            # prom/prometheus runs as nobody and writes its database to /prometheus.
            (rootfs / "prometheus").mkdir()
            os.chown(rootfs / "prometheus", 65534, 65534)
            shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        return rootfs

    def _import(self, tag: str, changes: list[str]) -> None:
        rootfs = self._rootfs()
        argv = ["docker", "import", *[a for c in changes for a in ("--change", c)], "-", tag]
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            run(argv, stdin=tar.stdout, timeout=900, env=self.engine.env)
        finally:
            tar.wait()
        self.images.append(tag)
        log.info("built stand-in %s from Debian bookworm", tag)

    def bases(self) -> None:
        stand_ins = {}
        if not self._pull(PYTHON_BASE):
            path = "/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            self._import(PYTHON_BASE, [f"ENV PATH={path}", 'CMD ["python3"]'])
            stand_ins[PYTHON_BASE] = "debootstrap bookworm + venv"
        if not self._pull(PROMETHEUS_IMAGE):
            self._import(PROMETHEUS_IMAGE, ['ENTRYPOINT ["/usr/bin/prometheus"]', "USER nobody", "WORKDIR /prometheus"])
            stand_ins[PROMETHEUS_IMAGE] = "debootstrap bookworm + Debian's prometheus"
        self.report["stand_in_bases"] = stand_ins
        self.report["cuda_base_available"] = self._pull(CUDA_BASE)

    # -- wheels -----------------------------------------------------------------------------
    def wheels(self) -> None:
        """Serve a host-prepared wheelhouse when the build cannot reach a package index."""
        probe = self.engine.docker(
            "run",
            "--rm",
            "--network",
            "host",
            PYTHON_BASE,
            "python",
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-d",
            "/tmp/probe",
            "six",
            timeout=120,
            check=False,
        )
        if probe.returncode == 0:
            self.report["build"] = "online (the build reached a package index)"
            return
        house = self.workdir / "wheelhouse"
        log.info("no package index inside the build: preparing a wheelhouse on the host")
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "-d",
                str(house),
                "torch==2.14.1",
                "torchvision==0.29.1",
                f"{ROOT}[serve,train]",
                "setuptools>=68,<81",
            ],
            timeout=1800,
        )
        port = free_port()
        self.wheel_server = LocalProcess(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(house)],
            port,
            self.workdir / "wheels.log",
        )
        self.wheel_server.wait_ready("/", timeout=30)
        url = f"http://127.0.0.1:{port}/"
        self.build_args = [
            "--build-arg",
            "PIP_NO_INDEX=1",
            "--build-arg",
            f"PIP_FIND_LINKS={url}",
            "--build-arg",
            f"TORCH_INDEX_URL={url}",
        ]
        size = run(["du", "-sh", str(house)]).stdout.split("\t")[0]
        self.report["build"] = f"offline, from a {size} wheelhouse served on 127.0.0.1"

    # -- images -----------------------------------------------------------------------------
    def build(self, dockerfile: str, target: str, tag: str) -> None:
        started = time.monotonic()
        self.engine.docker(
            "build",
            "--network",
            "host",
            "-f",
            f"docker/{dockerfile}",
            "--target",
            target,
            "-t",
            tag,
            *self.build_args,
            ".",
            cwd=ROOT,
            timeout=1800,
        )
        self.images.append(tag)
        size = int(self.engine.docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())
        self.report.setdefault("images", {})[tag] = {
            "size_mb": round(size / 2**20),
            "build_seconds": round(time.monotonic() - started),
        }
        log.info("built %s (%s target of %s): %d MB", tag, target, dockerfile, size // 2**20)

    def _api(self, name: str, *extra: str, env: dict[str, str] | None = None) -> str:
        env = {
            "ANYTIME_HOST": "127.0.0.1",
            "ANYTIME_PORT": str(self.settings.api_port),
            "ANYTIME_GRPC_PORT": "0",
            **(env or {}),
        }
        args = [
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            *[a for k, v in env.items() for a in ("-e", f"{k}={v}")],
            *extra,
            "anytime:cpu",
        ]
        cid = self.engine.docker(*args).stdout.strip()
        self.containers.append(name)
        return cid

    def _wait_healthy(self, name: str, timeout: float = 180) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            state = json.loads(self.engine.docker("inspect", "-f", "{{json .State}}", name).stdout)
            if state.get("Health", {}).get("Status") == "healthy":
                return time.monotonic() - started
            if not state["Running"]:
                raise SmokeFailed(f"{name} exited {state['ExitCode']}: {self._logs(name)}")
            time.sleep(1)
        raise SmokeFailed(f"{name} not healthy after {timeout} s: {self._logs(name)}")

    def _logs(self, name: str) -> str:
        return self.engine.docker("logs", "--tail", "30", name, check=False).stdout[-3000:]

    def _classify(self) -> dict:
        r = httpx.post(
            f"http://127.0.0.1:{self.settings.api_port}/classify",
            content=_png(),
            headers={"content-type": "image/png"},
            timeout=30,
        )
        if r.status_code != 200:
            raise SmokeFailed(f"/classify answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def api(self) -> None:
        _port_free(self.settings.api_port)
        self._api(f"{PREFIX}-api")
        healthy_s = self._wait_healthy(f"{PREFIX}-api")
        answer = self._classify()
        metrics = httpx.get(f"http://127.0.0.1:{self.settings.api_port}/metrics", timeout=10)
        if metrics.status_code != 200 or "anytime_requests_total" not in metrics.text:
            raise SmokeFailed(f"/metrics answered {metrics.status_code}")
        uid = self.engine.docker("exec", f"{PREFIX}-api", "id", "-u").stdout.strip()
        if uid == "0":
            raise SmokeFailed("the api container runs as root")
        started = time.monotonic()
        self.engine.docker("stop", "-t", "45", f"{PREFIX}-api", timeout=120)
        stop_s = time.monotonic() - started
        code = int(self.engine.docker("inspect", "-f", "{{.State.ExitCode}}", f"{PREFIX}-api").stdout)
        if code != 0:
            raise SmokeFailed(f"docker stop: exit code {code}: {self._logs(f'{PREFIX}-api')}")
        self.report["api"] = {
            "healthy_after_s": round(healthy_s, 1),
            "answer": _brief(answer, "label", "exit", "model", "version"),
            "uid": int(uid),
            "read_only_root": True,
            "docker_stop_s": round(stop_s, 1),
            "exit_code": code,
        }
        log.info(
            "api: healthy after %.0f s, answered %s, uid %s, stopped in %.1f s with 0",
            healthy_s,
            answer["label"],
            uid,
            stop_s,
        )

    def train(self) -> None:
        volume = f"{PREFIX}-models"
        self.engine.docker("volume", "create", volume)
        self.volumes.append(volume)
        script = (
            "python -m training.cli --model resnet_fmnist_narrow --method byot --epochs 1 --max-steps 30 "
            "--no-progress --out-dir /tmp/run && python -m training.export /tmp/run/best.pt --store /models "
            "--name smoke --latency-repeats 2"
        )
        started = time.monotonic()
        self.engine.docker(
            "run",
            "--rm",
            "--name",
            f"{PREFIX}-train",
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-v",
            f"{FASHION_MNIST}:/data:ro",
            "-v",
            f"{volume}:/models",
            "anytime:train",
            "sh",
            "-c",
            script,
            timeout=1200,
        )
        train_s = time.monotonic() - started
        self._api(f"{PREFIX}-api-trained", "-v", f"{volume}:/models", env={"ANYTIME_MODEL_NAME": "smoke"})
        self._wait_healthy(f"{PREFIX}-api-trained")
        answer = self._classify()
        if answer["model"] != "smoke":
            raise SmokeFailed(f"the trained model is not the one serving: {answer}")
        self.engine.docker("stop", "-t", "45", f"{PREFIX}-api-trained", timeout=120)
        self.report["train"] = {"train_and_export_s": round(train_s), "served": _brief(answer, "model", "version")}
        log.info(
            "train: one short epoch and export in %.0f s; a fresh api serves %s v%s",
            train_s,
            answer["model"],
            answer["version"],
        )

    def compose(self) -> None:
        """api + prometheus from docker-compose.yml with this machine's override (host network)."""
        _port_free(self.settings.api_port)
        _port_free(self.settings.prometheus_port)
        prom_dir = self.workdir / "prometheus"
        prom_dir.mkdir()
        config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        config["scrape_configs"] = [
            {"job_name": "anytime", "static_configs": [{"targets": [f"127.0.0.1:{self.settings.api_port}"]}]}
        ]
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        for rules in (ROOT / "docker" / "prometheus").glob("anytime.rules*.yml"):
            shutil.copy(rules, prom_dir / rules.name)
        os.chmod(prom_dir, 0o755)
        # Compose 1.29 refuses published ports under host networking, so the override is the
        # project's compose file with what host networking forbids taken out (ports, expose).
        project = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        services = {name: project["services"][name] for name in ("api", "prometheus")}
        for service in services.values():
            for key in ("ports", "expose", "build"):
                service.pop(key, None)
            service["network_mode"] = "host"
        services["api"]["environment"].update(
            {"ANYTIME_HOST": "127.0.0.1", "ANYTIME_PORT": str(self.settings.api_port), "ANYTIME_GRPC_PORT": "0"}
        )
        services["prometheus"]["volumes"][0] = f"{prom_dir}:/etc/prometheus:ro"
        services["prometheus"]["command"] = [
            *[c for c in services["prometheus"]["command"] if not c.startswith("--web.listen-address")],
            f"--web.listen-address=127.0.0.1:{self.settings.prometheus_port}",
        ]
        path = self.workdir / "docker-compose.smoke.yml"
        path.write_text(yaml.safe_dump({"services": services, "volumes": project["volumes"]}))
        compose = ["docker-compose", "-p", PREFIX, "--project-directory", str(ROOT), "-f", str(path)]
        env = self.engine.env
        try:
            run([*compose, "up", "-d", "--no-build", "api", "prometheus"], env=env, timeout=600, cwd=ROOT)
            end = time.monotonic() + 240
            up = requests = None
            while time.monotonic() < end:
                with contextlib.suppress(httpx.HTTPError, SmokeFailed):
                    self._classify()
                    up = _query(self.settings.prometheus_port, 'up{job="anytime"}')
                    requests = _query(self.settings.prometheus_port, "anytime_requests_total")
                    if up == 1 and requests is not None:
                        break
                time.sleep(2)
            if up != 1 or requests is None:
                logs = run([*compose, "logs", "--tail", "20"], env=env, check=False, cwd=ROOT).stdout[-3000:]
                raise SmokeFailed(f"Prometheus did not scrape the api (up={up}, requests={requests}):\n{logs}")
            self.report["compose"] = {
                "up": up,
                "anytime_requests_total": requests,
                "left_out": "lb (needs Docker's DNS: no bridge network here), grafana (no image here)",
            }
            log.info("compose: Prometheus scrapes the api (up=1, anytime_requests_total=%s)", requests)
        finally:
            run([*compose, "down", "-v", "--timeout", "45"], env=env, check=False, timeout=300, cwd=ROOT)

    # -- all --------------------------------------------------------------------------------
    def main(self) -> dict[str, object]:
        started = time.monotonic()
        try:
            self.engine.start()
            self.bases()
            self.wheels()
            self.build("Dockerfile", "serve", "anytime:cpu")
            self.build("Dockerfile", "train", "anytime:train")
            if self.report["cuda_base_available"]:
                self.build("Dockerfile.cuda", "serve", "anytime:cuda")
            else:
                self.report["cuda"] = f"not built: {CUDA_BASE} cannot be pulled here"
            self.api()
            self.train()
            self.compose()
            self.report["disk_used"] = self.engine.disk_used()
        finally:
            self.cleanup()
            self.report["wall_seconds"] = round(time.monotonic() - started)
        return self.report

    def cleanup(self) -> None:
        if self.engine.daemon is not None or self.engine.docker("info", check=False, timeout=30).returncode == 0:
            for name in self.containers:
                self.engine.docker("rm", "-f", name, check=False, timeout=120)
            for volume in self.volumes:
                self.engine.docker("volume", "rm", "-f", volume, check=False, timeout=60)
            if not self.settings.keep:
                for image in reversed(self.images):
                    self.engine.docker("rmi", "-f", image, check=False, timeout=300)
        self.engine.close()
        if self.wheel_server is not None:
            self.wheel_server.stop()


def _brief(answer: dict, *keys: str) -> dict:
    return {k: answer[k] for k in keys}


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (28, 28), 40).save(buf, format="PNG")
    return buf.getvalue()


def _port_free(port: int) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise SmokeFailed(f"127.0.0.1:{port} is taken; stop what listens there or set the port setting")


def _query(port: int, expr: str) -> float | None:
    r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=5).json()
    result = r["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="anytime-docker-smoke-"))
    try:
        yield path
    finally:
        # dockerd leaves its network namespace mounted under its exec root when it stops.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
            run(["umount", "-l", mount], check=False, timeout=60)
        run(["rm", "-rf", str(path)], check=False, timeout=600)


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(SmokeSettings, argv, "python -m tools.docker_smoke", __doc__.split("\n")[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        log.error("make docker-smoke needs root (dockerd, debootstrap)")
        return 2
    with _workdir() as workdir:
        try:
            report = Smoke(settings, workdir).main()
        except (SmokeFailed, subprocess.TimeoutExpired) as exc:
            log.error("docker smoke FAILED: %s", exc)
            return 1
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    log.info("docker smoke passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
