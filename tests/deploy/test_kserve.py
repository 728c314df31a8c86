"""deploy/kserve: a schema-valid InferenceService running our image as a v2 custom predictor, with
probes on the service's v2 routes, one GPU, a required API-key Secret and a hardened pod."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from deploy_support import ROOT, Dockerfile

KSERVE = ROOT / "deploy" / "kserve"
SCHEMA = KSERVE / "schema" / "inferenceservice-v1beta1.trimmed.yaml"
KUBERNETES_VERSIONS = ["1.29.0", "latest"]  # as tests/deploy/test_kubernetes.py
DELEGATED = "x-kubernetes-preserve-unknown-fields"


@pytest.fixture(scope="module")
def isvc() -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all((KSERVE / "inferenceservice.yaml").read_text()) if d]
    return document


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text())["openAPIV3Schema"]


@pytest.fixture(scope="module")
def container(isvc: dict[str, Any]) -> dict[str, Any]:
    (one,) = isvc["spec"]["predictor"]["containers"]
    return one


def _json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD structural schema as JSON Schema, every object closed (unknown fields are errors, as
    ``kubectl apply --validate=strict`` makes them) unless it preserves unknown fields."""
    node = copy.deepcopy(node)
    if "properties" in node:
        node["properties"] = {name: _json_schema(child) for name, child in node["properties"].items()}
        if not node.get(DELEGATED):
            node["additionalProperties"] = False
    if isinstance(node.get("items"), dict):
        node["items"] = _json_schema(node["items"])
    return node


def test_inferenceservice_validates_strictly_against_the_kserve_crd_schema(isvc: dict, schema: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[dev]' (kubernetes-validate brings it)")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    validator = jsonschema.Draft7Validator(_json_schema(schema))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(isvc)]
    assert errors == []
    # KServe names the predictor's Deployment, Service and HPA after it: a DNS-1035 label, with room for "-predictor"
    name = isvc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(f"{name}-predictor") <= 63


def test_a_typo_or_a_wrong_type_fails_the_schema(isvc: dict, schema: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(_json_schema(schema))
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["minReplica"] = 1
    wrong = copy.deepcopy(isvc)
    wrong["spec"]["predictor"]["maxReplicas"] = "two"
    missing = copy.deepcopy(isvc)
    del missing["spec"]["predictor"]
    for broken in (typo, wrong, missing):
        assert list(validator.iter_errors(broken)), broken["spec"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_predictor_pod_fields_validate_strictly_as_a_kubernetes_pod_spec(isvc: dict, schema: dict, version: str) -> None:
    """The predictor inlines a corev1.PodSpec: its pod fields (those the trimmed CRD schema delegates)
    must form a valid Pod spec for the Kubernetes releases the k8s manifests support."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    fields = schema["properties"]["spec"]["properties"]["predictor"]["properties"]
    predictor = isvc["spec"]["predictor"]
    pod_spec = {name: value for name, value in predictor.items() if fields.get(name, {}).get(DELEGATED)}
    assert "containers" in pod_spec
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": pod_spec}
    try:
        kubernetes_validate.validate(pod, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"spec.predictor as a PodSpec: {error}")


def test_custom_predictor_speaks_protocol_v2_on_kserves_port(isvc: dict, container: dict) -> None:
    assert container["name"] == "kserve-container"  # where KServe reads PROTOCOL and routes traffic
    env = {e["name"]: e for e in container["env"]}
    assert env["PROTOCOL"]["value"] == "v2"
    (port,) = container["ports"]
    assert port["containerPort"] == 8080 and port["name"] in ("http1", "h2c")
    assert int(env["PORT"]["value"]) == port["containerPort"], "the image's entry point listens on $PORT"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_probes_ask_the_services_open_inference_protocol_health_routes(container: dict) -> None:
    from app.routes.v2 import PROBE_PATHS

    port = container["ports"][0]["name"]
    expected = {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
                "readinessProbe": "/v2/health/ready"}
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": port}, probe
        assert path in PROBE_PATHS, f"{path}: not a probe route of app/routes/v2.py (open without an API key)"


def test_predictor_takes_one_gpu_and_requests_cpu_and_memory(isvc: dict, container: dict) -> None:
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert any(t["key"] == "nvidia.com/gpu" for t in predictor["tolerations"])


def test_api_keys_come_from_a_required_secret(container: dict) -> None:
    env = {e["name"]: e for e in container["env"]}
    reference = env["API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert reference["name"] == "crossmodal-api-keys" and reference["optional"] is False
    assert env["REQUIRE_API_KEYS"]["value"] == "true", "no keys: the pod refuses to start rather than serve without auth"


def test_pod_is_hardened_like_the_kubernetes_deployment(isvc: dict, container: dict, k8s_objects: dict,
                                                         dockerfile: Dockerfile) -> None:
    predictor = isvc["spec"]["predictor"]
    deployment = k8s_objects[("Deployment", "crossmodal-api")]["spec"]["template"]["spec"]
    (api,) = [c for c in deployment["containers"] if c["name"] == "api"]
    image_uid = int(dockerfile.stages["serve"].args("USER")[-1].split(":")[0])
    assert predictor["securityContext"] == deployment["securityContext"]
    assert predictor["securityContext"]["runAsNonRoot"] is True and predictor["securityContext"]["runAsUser"] == image_uid
    assert container["securityContext"] == api["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], "uploads spool to /tmp"
    assert container["image"].split(":")[0] == api["image"].split(":")[0]


def test_grace_period_outlasts_prestop_and_drain(isvc: dict, container: dict) -> None:
    from app.serve import SHUTDOWN_AFTER_DRAIN_S

    env = {e["name"]: e for e in container["env"]}
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = int(pre_stop[1]) + float(env["DRAIN_TIMEOUT"]["value"]) + SHUTDOWN_AFTER_DRAIN_S
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > needed


def test_vendored_schema_names_its_source() -> None:
    header = SCHEMA.read_text().split("openAPIV3Schema")[0]
    assert "kserve/kserve" in header and "serving.kserve.io_inferenceservices.yaml" in header
    assert re.search(r"commit[\s#]+[0-9a-f]{40}", header)
