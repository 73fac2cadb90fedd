"""Kubernetes manifests: valid against the Kubernetes schemas, and wired to each other,
to the image and to the server's settings and routes.

kubernetes-validate checks the built-in kinds against the published OpenAPI schemas
(strict: unknown fields fail). It has no schema for the Prometheus Operator's
ServiceMonitor (a CRD) nor for kustomization.yaml; those are checked by hand here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from fastapi.routing import APIRoute

from server.routers import energy, health
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSIONS = ("1.30.0", "1.37.0")
"""Oldest and newest Kubernetes minor versions checked."""
NOT_IN_SCHEMAS = {"ServiceMonitor"}


def _resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _resources() if d["kind"] == kind]
    return doc


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = sorted(d["kind"] for d in _resources())
    assert kinds == ["Deployment", "PersistentVolumeClaim", "Service", "ServiceMonitor"]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    for doc in _resources():
        if doc["kind"] in NOT_IN_SCHEMAS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, version, strict=True)
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_schema_violation_is_caught() -> None:
    """The validator really rejects a bad manifest (an unknown field, strict mode)."""
    deployment = _one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def _container() -> dict[str, Any]:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def test_selectors_ports_and_claims_line_up() -> None:
    deployment, service, monitor = _one("Deployment"), _one("Service"), _one("ServiceMonitor")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ports
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service_port["name"]]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {_one("PersistentVolumeClaim")["metadata"]["name"]}
    # One writer on a ReadWriteOnce store: a rolling update would start a second pod.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_pod_matches_the_image_and_the_server() -> None:
    dockerfile = DockerfileParser(str(ROOT / "Dockerfile"))
    container = _container()
    pod = _one("Deployment")["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(dockerfile.envs["XMA2_PORT"])
    uid = [i["value"] for i in dockerfile.structure if i["instruction"] == "USER"][-1]
    assert pod["securityContext"]["runAsUser"] == int(uid.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = [v for i in dockerfile.structure if i["instruction"] == "VOLUME"
               for v in json.loads(i["value"])]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    store_volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)["name"]
    assert [mounts.get(v) for v in volumes] == [store_volume] * len(volumes)
    # A read-only root needs writable /tmp and home (caches) from the pod.
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert {"/tmp", "/home/xma2"} <= set(mounts)
        assert dockerfile.envs["MPLCONFIGDIR"].startswith("/tmp/")
    # Every XMA2_* variable is a server setting (a typo would be silently ignored).
    settings = {f"XMA2_{name.upper()}" for name in Settings.model_fields}
    names = {e["name"] for e in container.get("env", []) if e["name"].startswith("XMA2_")}
    assert names and names <= settings, names - settings
    # The probes ask routes the server has.
    routes = {route.path for router in (health.router, energy.router)
              for route in router.routes if isinstance(route, APIRoute)}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes and get["port"] in ports, probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes
