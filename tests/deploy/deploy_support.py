"""Helpers for the deployment checks: the Dockerfile read into stages, compose files, external tools.

Nothing here needs a Docker engine. The external validators (hadolint, Debian's docker-compose,
kubernetes-validate) are found on PATH or next to the running interpreter; a test that needs one skips
only when it is not installed at all (`.ci/run` and the `dev` extra install them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = {
    "base": ["docker-compose.yml"],
    "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"],
    "scale": ["docker-compose.yml", "docker-compose.scale.yml"],
    "cpu+scale": ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.scale.yml"],
}


def find_tool(name: str) -> str | None:
    """A command on PATH, or installed into the running virtual environment."""
    beside_python = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside_python) if beside_python.is_file() else None)


# ---- Dockerfile -------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def args(self, keyword: str) -> list[str]:
        return [arguments for kw, arguments in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, name: str) -> list[Stage]:
        """The stage and every stage it is built FROM, nearest first."""
        stages = [self.stages[name]]
        while stages[-1].base in self.stages:
            stages.append(self.stages[stages[-1].base])
        return stages


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with their continuation lines joined; comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)\s+AS\s+(\S+)", arguments, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {arguments}"
            current = Stage(name=match.group(2), base=match.group(1))
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            name, _, default = arguments.partition("=")
            global_args[name] = default.strip('"')
        else:
            current.instructions.append((keyword, arguments))
    return Dockerfile(global_args=global_args, stages=stages)


# ---- compose -------------------------------------------------------------------------------------------------


def interpolate_defaults(text: str) -> str:
    """`${VAR:-default}` → default: the file as Compose reads it with none of its variables set."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)


def compose_environment() -> dict[str, str]:
    """This process's environment without anything the compose files interpolate or Compose itself reads."""
    names = set()
    for path in ROOT.glob("docker-compose*.yml"):
        names |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))
        names |= set(raw_compose(path).get("x-api-environment", {}))
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}


def raw_compose(path: Path) -> dict[str, Any]:
    return yaml.safe_load(interpolate_defaults(path.read_text()))


def run_compose_config(files: list[str]) -> subprocess.CompletedProcess[str]:
    tool = find_tool("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    command = [tool, "--project-directory", str(ROOT)]
    for name in files:
        command += ["-f", str(ROOT / name)]
    return subprocess.run([*command, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=compose_environment())


def published_ports(service: dict[str, Any]) -> dict[int, str]:
    """container port → published host port(s), from the short or the long port syntax."""
    ports: dict[int, str] = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["target"])] = str(entry.get("published", ""))
        else:
            parts = str(entry).split(":")
            ports[int(parts[-1].split("/")[0])] = parts[-2] if len(parts) > 1 else ""
    return ports


def duration_seconds(text: str | int | float) -> float:
    """Compose durations: `45s`, `1m30s`, `1m`, or a plain number of seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)
