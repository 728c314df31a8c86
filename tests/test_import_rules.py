"""Import rules, checked by reading the tree: app/ and training/ share only models/; no module shadows the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"app": {"training"}, "training": {"app"}, "models": {"app", "training", "fastapi", "PIL"}}


def _imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_a_forbidden_layer(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_top_levels(p) & FORBIDDEN[package]) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_pickle_based_torch_loading_anywhere() -> None:
    for package in ("app", "models", "training"):
        for path in (ROOT / package).rglob("*.py"):
            assert "torch.load(" not in path.read_text(), f"{path} uses torch.load (pickle)"


def test_no_module_shadows_the_standard_library() -> None:
    """A script's folder comes first on sys.path: a ``benchmarks/serving/profile.py`` hid the standard
    library's ``profile`` from ``cProfile`` (imported by spaCy) in ``run.py``, which then failed."""
    shadowing = [str(p.relative_to(ROOT)) for folder in ("app", "models", "training", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py") if p.stem in sys.stdlib_module_names]
    assert shadowing == []


def _imported_training_packages(path: Path) -> set[str]:
    """The ``training`` sub-packages a module imports (``training.text.data`` → ``text``), lazy imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        names |= {module.split(".")[1] for module in modules if module.startswith("training.") and "." in module}
    return names


@pytest.mark.parametrize(("package", "forbidden"), [
    ("engine", {"image", "text", "fusion", "studies", "cli", "evaluate", "export"}),  # the engine serves every task
    ("image", {"studies"}), ("text", {"studies"}), ("fusion", {"studies"}),  # a shipped recipe needs no study
])
def test_training_layers(package: str, forbidden: set[str]) -> None:
    files = sorted((ROOT / "training" / package).rglob("*.py"))
    assert files
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_training_packages(p) & forbidden) for p in files}
    offenders = {path: names for path, names in offenders.items() if names and not path.endswith("/cli.py")}
    assert offenders == {}
