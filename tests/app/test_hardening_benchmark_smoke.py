"""The hardening benchmark runs: the service, a normal client, the attack mix paced and flat out, and its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hardening_benchmark_reports_three_phases_and_every_attack(model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "hardening"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hardening" / "attack.py"), "--model-dir", str(model_dir),
                    "--seconds", "1", "--rate", "5", "--attack-rate", "2",
                    "--slowloris", "3", "--tool", "python", "--output", str(output)],
                   check=True, cwd=ROOT, timeout=300)
    results = json.loads(output.with_suffix(".json").read_text())
    for phase in ("calm", "paced", "flat_out"):
        assert results[phase]["client"]["requests"] > 0 and results[phase]["ready_after"] == 200
        assert results[phase]["peak_rss_tree_mb"] > 0 and results[phase]["healthz_worst_ms"] > 0
        assert results[phase]["load_generator_cpu_s"] > 0 and results[phase]["service_cpu_s"] > 0
    assert results["calm"]["attacks"] == {} and results["paced"]["attack_rate"] == 2
    assert results["flat_out"]["attack_rate"] == 0
    for phase in ("paced", "flat_out"):
        attacks = results[phase]["attacks"]
        assert {"json-array-over-limit", "form-fields-1000", "rle8-bombs-16", "slowloris", "no-key-2MB"} <= set(attacks)
        assert all(not status.startswith("5") for outcome in attacks.values() for status in outcome["statuses"])
    # a paced attacker sends at most its rate (plus the request already under way when the phase ends)
    assert sum(results["paced"]["attacks"]["json-array-over-limit"]["statuses"].values()) <= 2 * 1 + 2
    report = output.with_suffix(".md").read_text()
    assert "| normal client p99 |" in report and "| load generator CPU (this process) |" in report
    assert "attack, 2 req/s per attacker" in report and "attack flat out" in report
