"""The serving image installs `pip install .`: everything app/ and models/ import must come with it."""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from deploy_support import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SERVED_PACKAGES = ("app", "models")
OWN_PACKAGES = {"app", "models", "training"}


def _third_party_imports(package: str) -> dict[str, list[str]]:
    """top-level module → files of ``package`` that import it (every import, also inside functions)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN_PACKAGES and top != "__future__":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _serving_install(pyproject: dict[str, Any]) -> set[str]:
    """Distributions `pip install .` brings: the dependencies and what they require, extras of the project
    left out (the extras a dependency asks for, like uvicorn[standard], followed)."""
    wanted = [Requirement(text) for text in pyproject["project"]["dependencies"]]
    installed: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    while wanted:
        requirement = wanted.pop()
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in requirement.extras or {""}
        ):
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here, so none of its modules can be found below either
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        installed.add(name)
        for text in distribution.requires or []:
            child = Requirement(text)
            if child.marker is None:
                wanted.append(child)
            elif any(child.marker.evaluate({"extra": extra}) for extra in requirement.extras | {""}):
                child.marker = None
                wanted.append(child)
    return installed


def test_serving_packages_import_only_what_the_serving_install_brings(pyproject: dict) -> None:
    serving = _serving_install(pyproject)
    module_to_distributions = metadata.packages_distributions()
    problems = []
    for package in SERVED_PACKAGES:
        for module, files in sorted(_third_party_imports(package).items()):
            distributions = {canonicalize_name(d) for d in module_to_distributions.get(module, [])}
            if not distributions:
                problems.append(f"{module} (imported by {files[0]}) is not installed at all")
            elif not distributions & serving:
                problems.append(
                    f"{module} (imported by {files[0]}) comes from {sorted(distributions)}, "
                    "which `pip install .` does not install: add it to [project] dependencies"
                )
    assert not problems, "\n".join(problems)


def test_serving_install_leaves_the_training_only_packages_out(pyproject: dict) -> None:
    serving = _serving_install(pyproject)
    assert {"torch", "fastapi", "uvicorn", "safetensors"} <= serving
    assert not {"torchvision", "matplotlib", "scikit-learn"} & serving


def test_served_packages_import_something_third_party() -> None:
    """Guards the check above against passing because it found no imports."""
    imports = set().union(*(_third_party_imports(package) for package in SERVED_PACKAGES))
    assert {"torch", "safetensors"} <= imports
    if (ROOT / "app" / "main.py").is_file():
        assert "fastapi" in imports


@pytest.mark.parametrize("package", SERVED_PACKAGES)
def test_every_served_package_is_installed_by_setuptools(pyproject: dict, package: str) -> None:
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(Path(package).match(pattern) for pattern in includes)


@pytest.mark.parametrize("package", SERVED_PACKAGES)
def test_served_packages_hold_nothing_a_wheel_would_leave_behind(pyproject: dict, package: str) -> None:
    """The image installs the project as a wheel, not from the source tree: files other than modules
    (templates, vocabularies, examples) reach it only when declared as package data."""
    declared = pyproject["tool"].get("setuptools", {}).get("package-data", {})
    for path in (ROOT / package).rglob("*"):
        if path.is_file() and path.suffix not in {".py", ".pyc"} and "__pycache__" not in path.parts:
            patterns = declared.get(package, []) + declared.get("*", [])
            relative = path.relative_to(ROOT / package)
            assert any(relative.match(p) for p in patterns), f"{path.relative_to(ROOT)}: not in the installed package"
