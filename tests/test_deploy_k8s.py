"""Kubernetes manifests: every kustomization under deploy/k8s renders offline with ``kubectl kustomize``,
and the rendered objects of each overlay carry what a deft server needs to run well in a cluster:
native gRPC probes on the health service, a memory /dev/shm, a data volume, a grace period that covers
the server's drain, Service ports, a ServiceMonitor and a queue-driven autoscaler aimed at the right
objects, and environment variables that ``deft serve`` accepts.

No cluster is contacted. The manifests are written to render with both current kustomize (v5) and the
kustomize v2.0.3 inside Debian bookworm's kubectl 1.20; this test uses whichever ``kubectl`` is on PATH
(or ``$KUBECTL``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deft_client.proto import adapters_pb2, generation_pb2

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
HEALTH_SERVICES = {
    "",
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
}
CORE_KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "Secret", "Namespace"}
Doc = dict[str, Any]


def kubectl() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        pytest.skip(
            "kubectl not found: install it (Debian: `apt-get install kubernetes-client`) to render deploy/k8s"
        )
    return found


def render(folder: Path) -> list[Doc]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, f"kubectl kustomize {folder.relative_to(ROOT)} failed:\n{done.stderr}"
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert docs, f"{folder} rendered nothing"
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "deft")


def env_of(c: Doc) -> dict[str, Any]:
    """Name → literal value, or the valueFrom mapping."""
    env = c.get("env", [])
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicated env: {names}"
    return {e["name"]: e["value"] if "value" in e else e["valueFrom"] for e in env}


def metric_names_defined() -> set[str]:
    text = (ROOT / "server" / "metrics.py").read_text()
    return set(re.findall(r"^(deft_\w+)", text, re.M))


def test_overlays_exist() -> None:
    assert {"gpu", "cpu-tiny"} <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_kustomization_renders(folder: Path) -> None:
    for doc in render(folder):
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc


# ------------------------------------------------------------------------------------ every overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_probes_on_the_health_service(rendered, overlay: str) -> None:
    c = container(one(rendered[overlay], "Deployment"))
    env = env_of(c)
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert str(grpc_port) == env["DEFT_PORT"], "the grpc container port must be the port deft listens on"
    probes = {kind: c.get(f"{kind}Probe") for kind in ("startup", "readiness", "liveness")}
    for kind, probe in probes.items():
        assert probe and "grpc" in probe, f"{kind}Probe must be a native gRPC probe"
        assert probe["grpc"]["port"] == grpc_port, f"{kind}Probe port"
        assert probe["grpc"].get("service", "") in HEALTH_SERVICES, f"{kind}Probe service"
    # readiness follows the generation service (NOT_SERVING while loading and draining)
    assert probes["readiness"]["grpc"]["service"] == "deft.v1.GenerationService"

    def window(probe: Doc) -> int:
        return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)

    # liveness only runs once the startup probe passed: the startup probe must allow for the model load
    assert window(probes["startup"]) >= 120, "the startup probe gives the model too little time to load"
    assert window(probes["startup"]) > window(probes["liveness"])
    assert probes["liveness"].get("failureThreshold", 3) >= 2, "one slow answer must not restart the pod"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_shm_and_data(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(one(docs, "Deployment"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]
    assert shm.get("emptyDir", {}).get("medium") == "Memory", "/dev/shm must be a memory emptyDir"
    data_dir = env_of(c)["DEFT_DATA_DIR"]
    assert data_dir in mounts, f"DEFT_DATA_DIR {data_dir} is not a mounted volume"
    data = volumes[mounts[data_dir]]
    sources = {"emptyDir", "persistentVolumeClaim", "ephemeral"} & data.keys()
    assert len(sources) == 1, f"the data volume needs exactly one source: {data}"
    if "persistentVolumeClaim" in data:
        claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
        assert data["persistentVolumeClaim"]["claimName"] in claims
    for mount in c["volumeMounts"]:
        assert mount["name"] in volumes, f"mount of an undefined volume {mount['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_the_drain(rendered, overlay: str) -> None:
    deployment = one(rendered[overlay], "Deployment")
    c = container(deployment)
    drain = float(env_of(c).get("DEFT_GRACE_PERIOD", 30))
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    sleep = 0.0
    if "exec" in pre_stop and pre_stop["exec"]["command"][0] == "sleep":
        sleep = float(pre_stop["exec"]["command"][1])
    elif "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain + sleep, (
        f"terminationGracePeriodSeconds {grace} <= drain {drain}s + preStop {sleep}s"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_exposes_grpc_and_metrics(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    deployment = one(docs, "Deployment")
    c = container(deployment)
    env = env_of(c)
    service = one(docs, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items(), "the Service selects no deft pod"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert str(container_ports["metrics"]) == env["DEFT_METRICS_PORT"]
    assert str(container_ports["http"]) == env["DEFT_HTTP_PORT"]  # the OpenAI-compatible API
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["metrics"]["port"] == 9400
    for name, port in ports.items():
        target = port.get("targetPort", port["port"])
        assert target in container_ports or target in container_ports.values(), f"{name} → {target}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_ones_deft_serve_accepts(rendered, overlay: str) -> None:
    """Every DEFT_* variable is a real `deft serve` setting with a valid value (typos fail here)."""
    from deft_server.config import ServerSettings

    env = env_of(container(one(rendered[overlay], "Deployment")))
    values = {}
    for name, value in env.items():
        if not name.startswith("DEFT_"):
            continue
        if isinstance(value, dict):  # from a Secret: only its shape can be checked here
            assert "secretKeyRef" in value, f"{name}: {value}"
            value = "postgresql://user:password@postgres/deft"
        values[name.removeprefix("DEFT_").lower()] = value
    settings = ServerSettings(**values)  # unknown names and bad values raise
    assert settings.host == "0.0.0.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runs_as_the_image_user(rendered, overlay: str) -> None:
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    uid = re.search(r"useradd [^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid, "the Dockerfile creates no user with a fixed uid"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid[1])
    assert pod["securityContext"].get("fsGroup") is not None, "the data volume must be writable"


# ----------------------------------------------------------------------------------------------- gpu


def test_gpu_overlay(rendered) -> None:
    docs = rendered["gpu"]
    deployment = one(docs, "Deployment")
    c = container(deployment)
    env = env_of(c)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert env["DEFT_DEVICE"].startswith("cuda") and env["DEFT_DTYPE"] == "float16"
    # the shared registry URL holds a password: it must come from a Secret, never a literal
    ref = env["DEFT_REGISTRY"]
    assert isinstance(ref, dict) and ref["secretKeyRef"]["name"] and ref["secretKeyRef"]["key"]
    assert deployment["spec"]["template"]["spec"].get("tolerations"), "GPU nodes are usually tainted"


def test_gpu_service_monitor_scrapes_the_metrics_port(rendered) -> None:
    docs = rendered["gpu"]
    service, monitor = one(docs, "Service"), one(docs, "ServiceMonitor")
    assert monitor["apiVersion"].startswith("monitoring.coreos.com/")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"].get("namespace") == service["metadata"].get("namespace")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints and all(e["port"] in port_names for e in endpoints)
    assert [e for e in endpoints if e["port"] == "metrics" and e.get("path", "/metrics") == "/metrics"]


def test_gpu_autoscaler_follows_the_queue(rendered) -> None:
    docs = rendered["gpu"]
    deployment, scaler = one(docs, "Deployment"), one(docs, "ScaledObject")
    assert scaler["apiVersion"].startswith("keda.sh/")
    target = scaler["spec"]["scaleTargetRef"]
    assert (
        target.get("kind", "Deployment") == "Deployment" and target["name"] == deployment["metadata"]["name"]
    )
    assert scaler["metadata"].get("namespace") == deployment["metadata"].get("namespace")
    assert 1 <= scaler["spec"]["minReplicaCount"] < scaler["spec"]["maxReplicaCount"]
    triggers = [t for t in scaler["spec"]["triggers"] if t["type"] == "prometheus"]
    queries = [t["metadata"]["query"] for t in triggers]
    assert any("deft_requests_waiting" in q for q in queries), queries
    known = metric_names_defined()
    namespace = deployment["metadata"].get("namespace")
    for trigger, query in zip(triggers, queries, strict=True):
        assert float(trigger["metadata"]["threshold"]) > 0
        assert trigger["metadata"]["serverAddress"].startswith("http")
        for metric in re.findall(r"\b(deft_\w+)", query):
            assert metric in known, f"{metric} is not a metric the server exports"
        # Prometheus-operator adds the namespace label: the query must look at this deployment's
        labelled = re.search(r'namespace="([^"]+)"', query)
        assert labelled is None or labelled[1] == namespace, f"query {query} vs namespace {namespace}"


# ------------------------------------------------------------------------------------------ cpu-tiny


def test_cpu_tiny_overlay(rendered) -> None:
    docs = rendered["cpu-tiny"]
    deployment = one(docs, "Deployment")
    c = container(deployment)
    env = env_of(c)
    assert env["DEFT_MODEL"] == "tiny-sdxl" and env["DEFT_DEVICE"] == "cpu"
    resources = c.get("resources", {})
    assert not any("nvidia.com/gpu" in resources.get(k, {}) for k in ("limits", "requests"))
    # a laptop/kind cluster has no Prometheus operator or KEDA: only core kinds
    assert {d["kind"] for d in docs} <= CORE_KINDS, {d["kind"] for d in docs}
    # the SQLite registry on a ReadWriteOnce claim has a single writer
    pod = deployment["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    if "persistentVolumeClaim" in data:
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
