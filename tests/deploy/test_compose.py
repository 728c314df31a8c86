"""docker-compose.yml and its overrides: valid, and the api/train contract the README promises."""

from __future__ import annotations

import ast
import re
from typing import Any

import pytest
import yaml
from deploy_support import (
    COMPOSE_FILES,
    ROOT,
    Dockerfile,
    duration_seconds,
    published_ports,
    run_compose_config,
)

CHECKPOINTS = "/srv/crossmodal/checkpoints"
UVICORN_MARGIN_S = 5  # app.serve.SHUTDOWN_AFTER_DRAIN_S: uvicorn closes what is left after the drain


def _settings_environment_names() -> set[str]:
    """The environment variables app/settings.py reads: its Settings fields, upper-cased."""
    tree = ast.parse((ROOT / "app" / "settings.py").read_text())
    (settings,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Settings"]
    fields = [node.target.id for node in settings.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
    return {name.upper() for name in fields if name != "model_config"}


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path → (source, read_only), from the short or the long volume syntax."""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts[entry["target"]] = (entry["source"], bool(entry.get("read_only")))
        else:
            source, target, *mode = entry.split(":")
            mounts[target] = (source, "ro" in mode)
    return mounts


def _gpu_requests(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_docker_compose_config_accepts_every_file_and_override(variant: str) -> None:
    result = run_compose_config(COMPOSE_FILES[variant])
    assert result.returncode == 0, result.stderr


# ---- api --------------------------------------------------------------------------------------------------


def test_api_publishes_port_8000(compose_config: Any) -> None:
    api = compose_config()["services"]["api"]
    assert published_ports(api) == {8000: "8000"}
    assert api["environment"]["PORT"] == "8000"


@pytest.mark.parametrize(("variant", "service"), [("base", "api"), ("cpu", "api-cpu"), ("scale", "lb")])
def test_ports_are_published_on_this_machine_only_by_default(variant: str, service: str) -> None:
    result = run_compose_config(COMPOSE_FILES[variant])
    assert result.returncode == 0, result.stderr
    (port,) = yaml.safe_load(result.stdout)["services"][service]["ports"]
    host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]  # long or short syntax
    assert host_ip == "127.0.0.1", "auth is off unless API_KEYS is set: API_BIND/LB_BIND open it wider"


@pytest.mark.parametrize("service", ["api", "api-cpu"])
def test_api_runs_hardened(compose_config: Any, service: str) -> None:
    api = compose_config("cpu")["services"][service]
    assert api["read_only"] is True
    assert any(mount.startswith("/tmp:") for mount in api["tmpfs"]), "uploads spool to /tmp"
    assert api["cap_drop"] == ["ALL"] and api["security_opt"] == ["no-new-privileges:true"]
    assert api["mem_limit"] and 0 < int(api["pids_limit"]) <= 4096
    assert "REQUIRE_API_KEYS" in api["environment"]


def test_api_reserves_an_nvidia_gpu(compose_config: Any) -> None:
    (request,) = _gpu_requests(compose_config()["services"]["api"])
    assert request["driver"] == "nvidia" and request["capabilities"] == ["gpu"]
    assert request["count"] == 1, "one GPU per container: its single process runs one worker on it"


def test_api_health_check_asks_readyz(compose_config: Any) -> None:
    check = compose_config()["services"]["api"]["healthcheck"]
    assert check["test"][:4] == ["CMD", "python3", "-c", check["test"][3]]
    assert "http://127.0.0.1:8000/readyz" in check["test"][3]
    assert duration_seconds(check["start_period"]) >= 30 and check["retries"] >= 2


def test_api_serves_the_checkpoints_volume_read_only(compose_config: Any) -> None:
    config = compose_config()
    api = config["services"]["api"]
    assert api["environment"]["MODEL_DIR"] == CHECKPOINTS
    assert _mounts(api)[CHECKPOINTS] == ("checkpoints", True)
    assert "checkpoints" in config["volumes"]


def test_api_stop_grace_period_outlasts_the_drain(compose_config: Any) -> None:
    api = compose_config()["services"]["api"]
    drain = float(api["environment"]["DRAIN_TIMEOUT"])
    assert duration_seconds(api["stop_grace_period"]) > drain + UVICORN_MARGIN_S


def test_api_restarts_and_builds_the_cuda_serving_image(compose_config: Any, dockerfile: Dockerfile) -> None:
    api = compose_config()["services"]["api"]
    assert api["restart"] in {"always", "unless-stopped", "on-failure"}
    assert api["build"]["args"]["VARIANT"] == "cuda" and "target" not in api["build"]
    assert api["image"] == "crossmodal:cuda"


def test_api_passes_every_setting_of_the_service_through_the_environment(compose_config: Any) -> None:
    environment = compose_config()["services"]["api"]["environment"]
    missing = _settings_environment_names() - set(environment)
    assert not missing, f"settings the compose file cannot configure: {sorted(missing)}"


# ---- train ------------------------------------------------------------------------------------------------


def test_train_runs_the_training_cli_behind_a_profile(compose_config: Any, dockerfile: Dockerfile) -> None:
    train = compose_config()["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["target"] == "train" and "train" in dockerfile.stages
    command = train["command"]
    assert command[0] in {"pretrain-image", "finetune-image", "finetune-text", "finetune-fusion"}
    output = command[command.index("--output") + 1]
    assert output.startswith(CHECKPOINTS + "/"), "training writes where the API reads"
    assert command[command.index("--data") + 1] == "/data"


def test_train_reads_mounted_data_and_writes_the_api_volume(compose_config: Any) -> None:
    mounts = _mounts(compose_config()["services"]["train"])
    assert mounts["/data"][1] is True, "the data folder is mounted read-only"
    assert mounts[CHECKPOINTS] == ("checkpoints", False)


def test_train_gets_every_gpu_and_room_for_shared_memory(compose_config: Any) -> None:
    train = compose_config()["services"]["train"]
    (request,) = _gpu_requests(train)
    assert request["driver"] == "nvidia" and request["count"] == "all"
    assert "shm_size" in train


# ---- CPU override -----------------------------------------------------------------------------------------

IGNORED_IN_COMPARISON = {"build", "image", "deploy", "profiles", "networks"}


def _without(service: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in service.items() if k not in keys}


def test_cpu_override_parks_the_gpu_api_and_adds_a_cpu_twin(compose_config: Any) -> None:
    services = compose_config("cpu")["services"]
    assert services["api"]["profiles"] == ["gpu"], "a plain `up` must not start the GPU service"
    cpu = services["api-cpu"]
    assert "profiles" not in cpu and not _gpu_requests(cpu)
    assert cpu["build"]["args"]["VARIANT"] == "cpu" and cpu["image"] == "crossmodal:cpu"
    assert cpu["networks"]["default"]["aliases"] == ["api"], "the load balancer finds it as `api`"


def test_cpu_twin_matches_the_gpu_api_except_for_the_device(compose_config: Any) -> None:
    services = compose_config("cpu")["services"]
    gpu, cpu = (_without(services[name], IGNORED_IN_COMPARISON) for name in ("api", "api-cpu"))
    assert cpu.pop("environment").pop("DEVICE") == "cpu"
    gpu["environment"].pop("DEVICE")
    gpu.pop("environment")
    assert cpu == gpu


def test_cpu_train_twin_matches_train_except_for_the_device(compose_config: Any) -> None:
    services = compose_config("cpu")["services"]
    train, cpu = services["train"], services["train-cpu"]
    assert not _gpu_requests(cpu) and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert cpu["build"]["target"] == "train" and cpu["image"] == "crossmodal-train:cpu"
    assert _without(cpu, IGNORED_IN_COMPARISON) == _without(train, IGNORED_IN_COMPARISON)


# ---- scale-out override -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["scale", "cpu+scale"])
def test_scale_override_puts_a_load_balancer_in_front_of_api(compose_config: Any, variant: str) -> None:
    services = compose_config(variant)["services"]
    lb = services["lb"]
    assert published_ports(lb) == {8080: "8080"}
    ((source, read_only),) = [m for target, m in _mounts(lb).items() if target == "/etc/nginx/nginx.conf"]
    assert source.endswith("deploy/nginx/nginx.conf") and read_only
    assert re.fullmatch(r"nginx:1\.(2[89]|[3-9]\d)[\w.-]*", lb["image"]), "upstream `resolve` needs nginx >= 1.27.3"
    assert "healthcheck" in lb and lb["restart"] == "unless-stopped"
    assert "depends_on" not in lb, "the api service may be parked behind a profile (CPU override)"
    assert services["api"]["deploy"]["replicas"] >= 2


def test_nginx_balances_over_every_api_replica_and_skips_draining_ones() -> None:
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert re.search(r"resolver 127\.0\.0\.11\b", conf), "Docker's DNS, re-resolved as replicas come and go"
    upstream = re.search(r"upstream (\w+) \{(.*?)\}", conf, flags=re.S)
    assert upstream and re.search(r"server api:8000 resolve\b", upstream.group(2))
    assert "zone " in upstream.group(2) and "least_conn;" in upstream.group(2)
    assert f"proxy_pass http://{upstream.group(1)};" in conf
    assert re.search(r"proxy_next_upstream [^;]*\bhttp_503\b[^;]*\bnon_idempotent\b", conf)
    assert "listen 8080;" in conf
