"""Property-based requests generated from /openapi.json find no server error and no undocumented answer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servicekit import API_KEY

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_generated_requests_cause_no_server_error(main_server, tmp_path: Path) -> None:
    executable = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [executable, "run", f"{main_server.url}/openapi.json", "-H", f"Authorization: Bearer {API_KEY}",
         "--checks", CHECKS, "--max-examples", "6", "--max-time", "12", "--seed", "7", "--workers", "2",
         "--phases", "examples,coverage,fuzzing", "--generation-database", "none", "--no-color",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
