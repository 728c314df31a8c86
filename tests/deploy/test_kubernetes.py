"""deploy/k8s: schema-valid manifests; GPU per pod, probes, drain-aware shutdown, multi-node training Job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import ROOT, Dockerfile

K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes release the manifests promise to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.29.0", "latest"]


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return container


@pytest.fixture(scope="module")
def api(k8s_objects: dict) -> dict[str, Any]:
    return k8s_objects[("Deployment", "crossmodal-api")]


@pytest.fixture(scope="module")
def config(k8s_objects: dict) -> dict[str, str]:
    return k8s_objects[("ConfigMap", "crossmodal-config")]["data"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_strictly_against_the_kubernetes_schema(
    k8s_documents: list[tuple[Path, dict]], version: str
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    checked = 0
    for path, document in k8s_documents:
        if document["kind"] == "Kustomization":
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.name}: {document['kind']}/{document['metadata']['name']}: {error}")
        checked += 1
    assert checked >= 6


def test_kustomization_applies_the_service_and_leaves_the_training_job_out(k8s_documents: list) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in resources)
    assert resources == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "train-job.yaml"}


def test_api_pod_requests_one_gpu(api: dict) -> None:
    container = _container(api["spec"]["template"]["spec"], "api")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert api["spec"]["replicas"] >= 2


def test_api_probes_liveness_on_healthz_and_readiness_on_readyz(api: dict) -> None:
    container = _container(api["spec"]["template"]["spec"], "api")
    (port,) = container["ports"]
    assert port["containerPort"] == 8000
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": port["name"]}, probe


def test_api_grace_period_outlasts_prestop_and_drain(api: dict, config: dict) -> None:
    spec = api["spec"]["template"]["spec"]
    pre_stop = _container(spec, "api")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    from app.serve import SHUTDOWN_AFTER_DRAIN_S

    needed = int(pre_stop[1]) + float(config["DRAIN_TIMEOUT"]) + SHUTDOWN_AFTER_DRAIN_S
    assert spec["terminationGracePeriodSeconds"] > needed


def test_api_requires_its_api_key_secret(api: dict, config: dict) -> None:
    env = {e["name"]: e for e in _container(api["spec"]["template"]["spec"], "api")["env"]}
    reference = env["API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert reference["name"] == "crossmodal-api-keys" and reference.get("optional") is False
    assert config["REQUIRE_API_KEYS"] == "true", "no keys: the pod refuses to start rather than serve without auth"


def test_api_runs_as_the_image_user_with_a_read_only_root(api: dict, dockerfile: Dockerfile) -> None:
    spec = api["spec"]["template"]["spec"]
    image_uid = int(dockerfile.stages["serve"].args("USER")[-1].split(":")[0])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == image_uid
    container = _container(spec, "api")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], "uploads spool to /tmp"


def test_api_serves_the_shared_checkpoints_seeded_from_the_image(api: dict, config: dict) -> None:
    spec = api["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in _container(spec, "api")["volumeMounts"]}
    assert mounts[config["MODEL_DIR"]]["readOnly"] is True
    (seed,) = spec["initContainers"]
    assert seed["image"] == _container(spec, "api")["image"]
    assert "/srv/crossmodal/checkpoints/" in seed["command"][-1] and "mv -T" in seed["command"][-1]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims[mounts[config["MODEL_DIR"]]["name"]] == "crossmodal-checkpoints"


def test_service_routes_to_the_api_pods_named_port(api: dict, k8s_objects: dict) -> None:
    service = k8s_objects[("Service", "crossmodal-api")]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert api["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in _container(api["spec"]["template"]["spec"], "api")["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_training_job_runs_torchrun_on_every_node_against_pod_zero(k8s_objects: dict) -> None:
    job = k8s_objects[("Job", "crossmodal-train")]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    container = _container(pod, "train")
    env = {e["name"]: e for e in container["env"]}
    assert int(env["NODES"]["value"]) == spec["completions"]
    assert int(env["GPUS_PER_NODE"]["value"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    script = container["command"][-1]
    assert "torchrun" in script and "-m training " in script
    headless = k8s_objects[("Service", pod["subdomain"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert f"--master_addr={job['metadata']['name']}-0.{pod['subdomain']}" in script
