"""Kubernetes and KServe manifests (deploy/): schema-valid, and consistent with the server.

Every Kubernetes object is checked against the API's own OpenAPI schema (kubernetes-validate,
strict: unknown fields fail). The overlays are built with `kubectl kustomize` where kubectl is
installed (it is not a Debian package); without it, the base objects and each overlay's patch
are validated on their own.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import ServiceSettings as Settings
from tests.helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ("cpu", "gpu")


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _base() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    objects = [d for name in kustomization["resources"] for d in _docs((K8S / "base" / name).read_text())]
    return {d["kind"]: d for d in objects}


def _built(overlay: str) -> dict[str, dict[str, Any]] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    proc = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {d["kind"]: d for d in _docs(proc.stdout)}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_base_objects_are_valid_kubernetes() -> None:
    base = _base()
    assert set(base) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for obj in base.values():
        _validate(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_valid_objects(overlay: str) -> None:
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    for patch in kustomization.get("patches", []):
        obj = yaml.safe_load((K8S / "overlays" / overlay / patch["path"]).read_text())
        assert obj["kind"] in _base() and obj["metadata"]["name"] == _base()[obj["kind"]]["metadata"]["name"]
    built = _built(overlay)
    if built is None:
        return  # kubectl is missing: the base and the patch targets are checked above
    for obj in built.values():
        _validate(obj)
        assert obj["metadata"]["namespace"] == "anytime"
    deployment = built["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == built["Service"]["spec"]["selector"]
    assert labels["app.kubernetes.io/component"] == overlay  # cpu and gpu pods are separate Services
    assert built["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"anytime:{'cuda' if overlay == 'gpu' else 'cpu'}"
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and _env(container)["ANYTIME_DEVICE"] == "cuda"


def test_pods_drain_before_they_are_killed_and_probe_the_right_endpoints() -> None:
    deployment = _base()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    # Every ANYTIME_ variable is a real server setting.
    fields = {f"ANYTIME_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    assert pod["terminationGracePeriodSeconds"] > float(env["ANYTIME_DRAIN_GRACE_S"]) + float(
        env["ANYTIME_DRAIN_TIMEOUT_S"]
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_autoscaler_reads_the_gauge_that_the_adapter_serves() -> None:
    hpa = _base()["HorizontalPodAutoscaler"]
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    assert [r["name"]["as"] for r in rules] == [name] and name in rules[0]["seriesQuery"]
    assert name in (ROOT / "service" / "metrics.py").read_text()


def test_inference_service_names_what_kserve_requires() -> None:
    isvc = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    container = predictor["containers"][0]
    assert container["name"] == "kserve-container" and len(container["ports"]) == 1
    port = container["ports"][0]["containerPort"]
    env = _env(container)
    assert env["ANYTIME_PORT"] == str(port) and env["ANYTIME_HOST"] == "0.0.0.0"
    assert set(env) <= {f"ANYTIME_{name.upper()}" for name in Settings.model_fields}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port
        assert container[probe]["httpGet"]["path"].startswith("/v2/health/")
    # The predictor's pod fields are a Kubernetes PodSpec: validate them as one.
    pod = {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas")}
    _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod})


def test_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for path in ("deploy/k8s/overlays/cpu", "deploy/k8s/overlays/gpu", "deploy/kserve/inferenceservice.yaml"):
        assert path in readme and Path(ROOT / path).exists()
