"""deploy/k8s renders offline with ``kubectl kustomize``, passes the Kubernetes schema, and
the lockgate Deployment probes the gRPC health service, drains before it dies, and (GPU
overlay) asks for a GPU. The Dockerfile is checked for its two variants (no docker here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lockgate.config import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]
TARGETS = ["base", "monitoring", *(f"overlays/{o}" for o in OVERLAYS)]
KUBERNETES_VERSION = "1.30.0"
SERVING_PORT = 8001
HTTP_PORT = 8000  # KServe v2 REST, admin API over REST, console


def _kubectl() -> str:
    """kubectl on PATH, else the Debian package (``kubectl``, or bookworm's ``kubernetes-client``)."""
    found = shutil.which("kubectl")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        for package in ("kubectl", "kubernetes-client"):
            if subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", package],
                              capture_output=True, env=env, timeout=600).returncode == 0:
                break
        found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is needed to render deploy/k8s (apt-get install kubectl / kubernetes-client)")
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    kubectl = _kubectl()
    out: dict[str, list[dict[str, Any]]] = {}
    for target in TARGETS:
        result = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
        out[target] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
    return found[0]


def _lockgate_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = _one(objects, "Deployment", "lockgate")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "lockgate")


def _server_settings(objects: list[dict[str, Any]]) -> ServerSettings:
    config_maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("lockgate-config")]
    assert len(config_maps) == 1
    return ServerSettings.model_validate(yaml.safe_load(config_maps[0]["data"]["server.yaml"]))


@pytest.mark.parametrize("target", TARGETS)
def test_objects_pass_kubernetes_schema(rendered: dict[str, list[dict[str, Any]]], target: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = rendered[target]
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} in {target}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_object_and_references_resolve(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[f"overlays/{overlay}"]
    kinds = {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else o["metadata"]["name"])
             for o in objects}
    for expected in [("Deployment", "lockgate"), ("Service", "lockgate"), ("HorizontalPodAutoscaler", "lockgate"),
                     ("PodDisruptionBudget", "lockgate"), ("ConfigMap", "lockgate-config"), ("Secret", "lockgate-store"),
                     ("Secret", "lockgate-tokens"), ("PersistentVolumeClaim", "lockgate-models"),
                     ("Deployment", "otel-collector"), ("Service", "otel-collector"), ("ConfigMap", "otel-collector-config"),
                     ("Deployment", "prometheus"), ("ConfigMap", "prometheus-config")]:
        assert expected in kinds, f"{expected} missing from overlay {overlay}"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"lockgate"}
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
        for volume in spec["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names  # generator hash applied
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
    hpa = _one(objects, "HorizontalPodAutoscaler", "lockgate")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lockgate"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = _one(objects, "PodDisruptionBudget", "lockgate")
    service = _one(objects, "Service", "lockgate")
    pod_labels = _one(objects, "Deployment", "lockgate")["spec"]["template"]["metadata"]["labels"]
    for selector in (pdb["spec"]["selector"]["matchLabels"], service["spec"]["selector"]):
        assert selector and all(pod_labels.get(k) == v for k, v in selector.items())
    assert {p["port"] for p in service["spec"]["ports"]} == {HTTP_PORT, SERVING_PORT, 8002}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_drain_and_wiring(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[f"overlays/{overlay}"]
    deployment = _one(objects, "Deployment", "lockgate")
    pod = deployment["spec"]["template"]
    container = _lockgate_container(objects)
    settings = _server_settings(objects)
    assert settings.grpc_port == SERVING_PORT and settings.metrics_port == 8002
    assert deployment["spec"]["replicas"] >= 2
    # Probes: the standard gRPC health service on the serving port, whole-server status.
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": SERVING_PORT, "service": ""}, probe
    # Drain: preStop sleep, then SIGTERM drains for drain_timeout_s, all inside the grace period.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    match = re.search(r"sleep (\d+)", " ".join(command))
    assert match, command
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(match.group(1)) + settings.drain_timeout_s
    # Ports, metrics scraping, telemetry.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT, "grpc": SERVING_PORT, "metrics": 8002}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"
    env = {e["name"]: e for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].startswith("http://otel-collector:4317")
    assert _one(objects, "Service", "otel-collector")["spec"]["ports"][0]["port"] == 4317
    # Store from a Secret, tokens as a mounted file, model repository from a PVC.
    assert env["LOCKGATE_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "lockgate-store", "key": "url"}
    assert "--store=$(LOCKGATE_STORE)" in container["args"] and container["args"][0] == "serve"
    tokens_arg = next(a for a in container["args"] if a.startswith("--tokens-file="))
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert tokens_arg.split("=", 1)[1].startswith(mounts["tokens"]["mountPath"] + "/")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["tokens"]["secret"]["secretName"] == "lockgate-tokens"
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "lockgate-models"
    assert mounts["models"]["mountPath"] == str(settings.model_repository) and mounts["models"]["readOnly"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    # Secrets shipped here are examples and say so.
    for secret in (o for o in objects if o["kind"] == "Secret"):
        assert secret["metadata"]["annotations"]["lockgate.dev/placeholder"] == "true"
    store_url = _one(objects, "Secret", "lockgate-store")["stringData"]["url"]
    assert store_url.startswith("postgresql://") and "PLACEHOLDER" in store_url


def test_gpu_overlay_requests_gpus_and_cpu_does_not(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gpu = _lockgate_container(rendered["overlays/gpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"].endswith("-cuda")
    pod = _one(rendered["overlays/gpu"], "Deployment", "lockgate")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    cpu = _lockgate_container(rendered["overlays/cpu"])
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert cpu["image"].endswith("-cpu")


def test_monitoring_configs_parse(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["monitoring"]
    collector = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("otel-collector-config"))
    config = yaml.safe_load(collector["data"]["otel-collector.yaml"])
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    for pipeline in config["service"]["pipelines"].values():
        assert set(pipeline["exporters"]) <= set(config["exporters"])
        assert set(pipeline["receivers"]) <= set(config["receivers"])
    prometheus = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("prometheus-config"))
    scrape = yaml.safe_load(prometheus["data"]["prometheus.yml"])
    assert scrape["scrape_configs"][0]["kubernetes_sd_configs"][0]["role"] == "pod"
    rules = yaml.safe_load(prometheus["data"]["alerts.yml"])
    assert rules["groups"] and all(r.get("alert") and r.get("expr") for g in rules["groups"] for r in g["rules"])


def test_dockerfile_has_cpu_and_cuda_variants() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = {name for _, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, flags=re.MULTILINE)}
    assert {"base-cpu", "base-gpu", "base", "build", "runtime"} <= stages
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.MULTILINE))
    assert args["VARIANT"] == "cpu"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    # onnxruntime-gpu >= 1.27 is built for CUDA 13 (<= 1.26 for CUDA 12): image and wheel must agree.
    assert re.fullmatch(r"nvidia/cuda:13\.[\d.]+-cudnn-runtime-ubuntu24\.04", args["CUDA_IMAGE"])
    assert args["ORT_GPU_CONSTRAINT"] == "onnxruntime-gpu>=1.27"
    assert 'pip install -c /tmp/constraints.txt' in text and 'ldd "$lib" | grep "not found"' in text
    gpu_stage = text.split("AS base-gpu", 1)[1].split("FROM ", 1)[0]
    assert "LOCKGATE_ONNXRUNTIME=gpu" in gpu_stage and "gpu,postgres" in gpu_stage
    assert 'pip install -c /tmp/constraints.txt ".[${LOCKGATE_EXTRAS}]"' in text
    assert re.search(r'^ENTRYPOINT \["tini", "--", "lockgate"\]', text, flags=re.MULTILINE)
    assert re.search(r'^CMD \["serve"', text, flags=re.MULTILINE)
    assert re.search(r"^USER 10001", text, flags=re.MULTILINE)
    # Everything the build copies exists in the repository.
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
