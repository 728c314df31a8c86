"""The transfer study runs end to end on a tiny budget and writes an honest table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from training.cli import main


def test_transfer_study_quick_writes_table_plot_and_every_arm(image_trunk_checkpoint: Path, news_subset: Path,
                                                             tmp_path: Path) -> None:
    results = tmp_path / "study"
    assert main(["transfer-study", "--from", str(image_trunk_checkpoint), "--data", str(news_subset),
                 "--output", str(results), "--quick", "--device", "cpu"]) == 0
    table = (results / "results.md").read_text()
    for arm in ("scratch", "random-frozen", "image-frozen", "image-finetuned", "tfidf-svm"):
        assert f"`{arm}`" in table
    assert "50% labels" in table and "100% labels" in table and " ± " in table
    assert (results / "transfer.png").stat().st_size > 1000
    runs = json.loads((results / "runs.json").read_text())
    assert len(runs) == 10 and all(0.0 <= r["accuracy"] <= 1.0 for r in runs)
    # a second call resumes: nothing is trained again
    assert main(["transfer-study", "--from", str(image_trunk_checkpoint), "--data", str(news_subset),
                 "--output", str(results), "--quick", "--device", "cpu"]) == 0
    assert json.loads((results / "runs.json").read_text()) == runs
    # an interrupted study still reports what it has: drop some runs, report without training anything
    kept = [r for r in runs if not (r["fraction"] == 1.0 and r["arm"] in ("scratch", "tfidf-svm"))]
    (results / "runs.json").write_text(json.dumps(kept))
    assert main(["transfer-study", "--from", str(image_trunk_checkpoint), "--data", str(news_subset),
                 "--output", str(results), "--quick", "--report-only"]) == 0
    assert json.loads((results / "runs.json").read_text()) == kept
    rows = {line.split(" | ")[0].strip("| `"): line for line in (results / "results.md").read_text().splitlines()}
    assert rows["scratch"].endswith("| not run |") and rows["tfidf-svm"].endswith("| not run |")
    assert "not run" not in rows["image-frozen"]
