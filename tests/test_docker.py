"""Static checks of the compose file, Dockerfiles, Prometheus and Grafana configuration.

No Docker engine runs here, so these read the files as `docker compose up` would.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.helpers import require_binary

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_valid_in_every_profile() -> None:
    tool = require_binary("docker-compose")
    for profiles in ([], ["--profile", "gpu", "--profile", "train"]):
        proc = subprocess.run([tool, *profiles, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


def test_every_path_compose_and_dockerfiles_reference_exists() -> None:
    compose = _compose()
    dockerfiles = set()
    for name, svc in compose["services"].items():
        if "build" in svc:
            context = ROOT / svc["build"]["context"]
            assert context.is_dir(), name
            dockerfiles.add(context / svc["build"]["dockerfile"])
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    assert {p.name for p in dockerfiles} == {"Dockerfile", "Dockerfile.cuda"}
    for dockerfile in dockerfiles:
        for line in dockerfile.read_text().splitlines():
            m = re.match(r"COPY (?:--\S+ )*(\S+) \S+$", line.strip())
            if m:
                assert (ROOT / m.group(1)).exists(), f"{dockerfile.name}: COPY {m.group(1)}"


def test_dockerfiles_run_the_server_safely() -> None:
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        serve = text[text.index("AS serve") :]
        assert "USER anytime" in serve and "HEALTHCHECK" in serve and '"service.healthcheck"' in serve
        assert "ANYTIME_HOST=0.0.0.0" in serve and "ANYTIME_PORT=8000" in serve and "EXPOSE 8000" in serve
        assert "COPY --chown=anytime:anytime model_store /models" in serve
        assert 'CMD ["python", "-m", "service.main"]' in serve


def test_prometheus_scrapes_every_replica_and_the_balancer() -> None:
    compose = _compose()
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    discovered = jobs["anytime"]["dns_sd_configs"][0]
    assert set(discovered["names"]) == {"api", "api-gpu"} and discovered["port"] == 8000
    assert compose["services"]["api"]["expose"] == ["8000"] and "ports" not in compose["services"]["api"]
    assert {p.rsplit(":", 1)[1] for p in compose["services"]["api-gpu"]["ports"]} == {"8000"}
    assert jobs["haproxy"]["static_configs"][0]["targets"] == ["lb:8404"]
    lb = compose["services"]["lb"]
    assert {"127.0.0.1:8000:8000", "127.0.0.1:8404:8404"} <= set(lb["ports"])
    assert lb["environment"]["ANYTIME_LB_STATS_BIND"] == ":8404"
    assert lb["volumes"][0].startswith("./docker/haproxy:/usr/local/etc/haproxy")
    mounted = compose["services"]["prometheus"]["volumes"][0]
    assert mounted.startswith("./docker/prometheus:/etc/prometheus")
    assert (DOCKER / "prometheus" / config["rule_files"][0]).is_file()


def test_haproxy_accepts_both_server_files() -> None:
    tool = require_binary("haproxy")
    haproxy = DOCKER / "haproxy"
    servers = "server r1 127.0.0.1:1 check\n"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "servers.cfg"
        local.write_text(f"backend api\n    {servers}")
        for extra in (haproxy / "compose-servers.cfg", local):
            proc = subprocess.run([tool, "-c", "-f", str(haproxy / "haproxy.cfg"), "-f", str(extra)],
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_accepts_config_and_rules() -> None:
    tool = require_binary("promtool")
    checks = (["check", "config", "prometheus.yml"], ["check", "rules", "anytime.rules.yml"],
              ["test", "rules", "anytime.rules.test.yml"])  # fmt: skip
    for args in checks:
        proc = subprocess.run([tool, *args], cwd=DOCKER / "prometheus", capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_uses_the_provisioned_datasource_and_is_generated() -> None:
    provisioned = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "anytime.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    sys.path.insert(0, str(DOCKER / "grafana"))
    try:
        import build_dashboard
    finally:
        sys.path.pop(0)
    assert dashboard == build_dashboard.build(), "run python docker/grafana/build_dashboard.py"
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "anytime.yml").read_text())
    mount = next(
        v for v in _compose()["services"]["grafana"]["volumes"] if "dashboards" in v and "provisioning" not in v
    )
    assert mount.split(":")[1] == provider["providers"][0]["options"]["path"]
