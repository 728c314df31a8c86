"""Fixtures for the deployment checks (helpers live in deploy_support.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    COMPOSE_FILES,
    ROOT,
    Dockerfile,
    find_tool,
    parse_dockerfile,
    raw_compose,
    run_compose_config,
)


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(ROOT / "Dockerfile")


@pytest.fixture(scope="session")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="session")
def compose_config() -> Any:
    """`compose_config(variant)`: the merged configuration of one COMPOSE_FILES entry, as Compose sees it.

    With docker-compose installed this is its `config` output (merged, interpolated, validated); without
    it, the base file alone is read with PyYAML and its variables' defaults (overrides need the tool).
    """
    cache: dict[str, dict[str, Any]] = {}

    def load(variant: str = "base") -> dict[str, Any]:
        if variant not in cache:
            if find_tool("docker-compose") is None and variant == "base":
                cache[variant] = raw_compose(ROOT / "docker-compose.yml")
            else:
                result = run_compose_config(COMPOSE_FILES[variant])
                assert result.returncode == 0, result.stderr
                cache[variant] = yaml.safe_load(result.stdout)
        return cache[variant]

    return load


@pytest.fixture(scope="session")
def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    documents = []
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        documents += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


@pytest.fixture(scope="session")
def k8s_objects(k8s_documents: list[tuple[Path, dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) → object, for the Kubernetes objects (not the kustomization)."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in k8s_documents if "metadata" in doc}
