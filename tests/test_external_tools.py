"""Every program a test or benchmark runs is installed by the project's own files.

A tool is either a console script of the Python environment (a dependency in pyproject.toml) or a
Debian package named in the Makefile's ``SYSTEM_TOOLS`` (``make system-tools``, run by ``.ci/run``).
Found by reading the sources: ``shutil.which``/``find_tool`` look-ups and subprocess commands
that start with a literal program name.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOOKUPS = {"which", "find_tool"}
RUNNERS = {"run", "Popen", "check_output", "check_call", "call"}
# Always there on a Debian/Python machine; not something an install step could forget.
BASE_SYSTEM = {"sh", "bash", "env", "kill", "tar", "git", "make"}


def system_tools() -> dict[str, str]:
    """The Makefile's ``SYSTEM_TOOLS``: command → Debian package."""
    line = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("SYSTEM_TOOLS"))
    return dict(pair.split(":") for pair in line.split(":=", 1)[1].split())


def _called_name(call: ast.Call) -> str:
    function = call.func
    return function.attr if isinstance(function, ast.Attribute) else function.id if isinstance(function, ast.Name) else ""


def programs_called(path: Path) -> set[str]:
    programs = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        first, name = node.args[0], _called_name(node)
        if name in LOOKUPS and isinstance(first, ast.Constant) and isinstance(first.value, str):
            programs.add(first.value)
        elif name in RUNNERS and isinstance(first, ast.List) and first.elts:
            head = first.elts[0]
            if isinstance(head, ast.Constant) and isinstance(head.value, str):
                programs.add(head.value)
    return programs


def test_the_scan_finds_the_tools_we_know_are_called() -> None:
    found = set().union(*(programs_called(p) for p in (ROOT / "benchmarks").rglob("*.py")))
    assert {"wrk", "py-spy"} <= found


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_every_program_called_is_installed_by_the_project(folder: str) -> None:
    installed_by_pip = {p.name for p in Path(sys.executable).parent.iterdir()}
    tools = system_tools()
    missing = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for program in programs_called(path) - BASE_SYSTEM:
            if re.fullmatch(r"[\w.+-]+", program) and program not in tools and program not in installed_by_pip:
                missing[program] = str(path.relative_to(ROOT))
    assert missing == {}, "add each to the Makefile's SYSTEM_TOOLS or to pyproject.toml's dependencies"


def test_system_tools_are_debian_packages_installed_by_ci() -> None:
    assert "make system-tools" in (ROOT / ".ci" / "run").read_text()
    assert {"wrk", "docker-compose", "chromium"} <= set(system_tools())


@pytest.mark.skipif(not os.environ.get("CROSSMODAL_EXPECT_NO_SYSTEM_TOOLS"), reason="only on the bare PATH CI step")
def test_without_system_tools_the_load_tool_falls_back_to_locust() -> None:
    from benchmarks.serving.harness import pick_tool

    assert [tool for tool in system_tools() if shutil.which(tool)] == []  # the PATH really is bare
    assert pick_tool("auto") == "locust"
