"""The serving benchmark itself runs: real servers (ours batched and unbatched, LitServe), a real load tool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from benchmarks.serving.run import CIFAR, NEWS

ROOT = Path(__file__).resolve().parents[2]
SENT_FROM = {"image": CIFAR, "text": NEWS}  # the shared archive the benchmark takes its real image or posts from


@pytest.mark.parametrize("task", ["image", "text"])
def test_serving_benchmark_measures_every_server_without_errors(task: str, model_dir: Path, tmp_path: Path) -> None:
    if not SENT_FROM[task].is_file():
        pytest.skip(f"shared data missing: {SENT_FROM[task]}")
    output = tmp_path / f"bench-{task}"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving" / "run.py"), "--model-dir", str(model_dir),
                    "--task", task, "--duration", "1", "--levels", "1,4", "--batch-sizes", "1,4", "--rounds", "2",
                    "--output", str(output)], check=True, cwd=ROOT, timeout=300)
    results = json.loads(output.with_suffix(".json").read_text())
    assert results["task"] == task and set(results["servers"]) == {"batched", "unbatched", "litserve"}
    for server in results["servers"].values():
        assert [level["clients"] for level in server["levels"]] == [1, 4]
        assert all(level["requests"] > 0 and level["errors"] == 0 for level in server["levels"])
        assert all(len(level["runs"]) == 2 for level in server["levels"])  # interleaved rounds
        assert server["memory_after_load"]["pss_total_mb"] > 0
    assert results["ratios"]["4"]["vs_unbatched"]["median"] > 0 and len(results["ratios"]["4"]["vs_litserve"]["rounds"]) == 2
    paced = results["servers"]["batched"]["half_max_rate"]
    assert paced["requests"] > 0 and paced["errors"] == 0
    assert results["in_process"]["best_items_per_s"] > 0
    assert "Targets at 4 clients" in output.with_suffix(".md").read_text()
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(model_dir) in " ".join(p.info["cmdline"] or [])]
    assert left == [], "a server process outlived the benchmark (it would skew the next measurement)"
