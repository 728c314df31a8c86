"""benchmarks/finetune/small_data.py runs: the real commands on a carved subset, a report and a plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from datakit import extract_news_subset

from benchmarks.finetune.small_data import TEXT_TRIPLES

ROOT = Path(__file__).resolve().parent.parent


def test_text_learning_curve_trains_scores_and_reports(tmp_path: Path) -> None:
    news = extract_news_subset(tmp_path / "news", per_class=40, classes=TEXT_TRIPLES[0])
    output = tmp_path / "curve"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune" / "small_data.py"), "--tasks", "text",
                    "--text-data", str(news), "--text-sizes", "10", "--triples", "1", "--output", str(output)],
                   check=True, cwd=ROOT, timeout=300, capture_output=True)
    rows = json.loads(output.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["per_class"] == 10 and rows[0]["calibration_folds"] == 5
    assert rows[0]["eval_count"] == 3 * 12  # the latest 30% of 40 posts per group
    assert rows[0]["accuracy"] > 1 / 3  # chance
    assert "| 10 |" in output.with_suffix(".md").read_text()
    assert output.with_suffix(".png").stat().st_size > 1000
