"""The prepared GPU check (benchmarks/gpu): its scripts parse, and what they call exists.

The whole script runs, on a CPU, with ``GPU_CHECK_SMOKE=1`` in about 3.5 minutes (see
benchmarks/gpu/README.md): too long for this suite, so only what breaks it silently is checked here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks" / "gpu").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_parses(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_the_serving_benchmark_takes_the_device_the_check_passes() -> None:
    help_text = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving" / "run.py"), "--help"],
                               check=True, capture_output=True, text=True).stdout
    assert "--device" in help_text


def test_the_kit_is_ignored_by_git() -> None:
    ignored = subprocess.run(["git", "check-ignore", ".gpu/wheels/x.whl"], cwd=ROOT, capture_output=True, text=True)
    assert ignored.returncode == 0, "the kit (data, wheels) must never be committed"
