"""The temporal-split benchmark: later posts held out per class, and a real run on a few real posts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.text.score_service import score
from benchmarks.text.temporal_split import temporal_split

ROOT = Path(__file__).resolve().parents[2]


def test_each_class_holds_out_its_highest_article_numbers(tmp_path: Path) -> None:
    for name, numbers in (("sci.space", [7, 100, 9, 12, 55, 8, 61, 10]), ("rec.autos", [3, 1, 2, 4])):
        (tmp_path / "data" / name).mkdir(parents=True)
        for number in numbers:
            (tmp_path / "data" / name / str(number)).write_text(f"post {number}")
    counts = temporal_split(tmp_path / "data", tmp_path / "split", 0.25)
    assert counts == (9, 3)
    held_out = {path.parent.name: sorted(int(p.name) for p in path.parent.iterdir())
                for path in (tmp_path / "split" / "val").glob("*/*")}
    assert held_out == {"sci.space": [61, 100], "rec.autos": [4]}  # by number, not by name ("9" > "100")
    assert (tmp_path / "split" / "train" / "sci.space" / "55").read_text() == "post 55"


def test_a_run_trains_on_the_earlier_posts_and_scores_the_later_ones(news_subset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for folder in sorted(news_subset.iterdir())[:3]:
        shutil.copytree(folder, data / folder.name)
    output = tmp_path / "table.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "text" / "temporal_split.py"), "--data", str(data),
                    "--work", str(tmp_path / "work"), "--fraction", "0.3", "--variant",
                    "small=--max-char-ngrams 2000 --validation-fraction 0.2", "--output", str(output)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    table = output.read_text()
    assert "| small | `--max-char-ngrams 2000 --validation-fraction 0.2` |" in table
    assert "reference: TF-IDF" in table
    manifest = json.loads((tmp_path / "work" / "small" / "manifest.json").read_text())
    assert manifest["classes"] == sorted(folder.name for folder in data.iterdir())
    # the same checkpoint scored through the real service (in float32, as offline) gives the evaluation's accuracy
    served = score(tmp_path / "work" / "small", tmp_path / "work" / "split" / "val", batch=8, env={"PRECISION": "fp32"})
    assert served["texts"] == len(list((tmp_path / "work" / "split" / "val").glob("*/*")))
    assert f"| {served['accuracy']:.2%} |" in table and 0.0 <= served["ece"] <= 1.0


def test_split_only_writes_the_split_and_trains_nothing(news_subset: Path, tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "text" / "temporal_split.py"), "--data", str(news_subset),
                    "--work", str(tmp_path / "work"), "--split-only"], cwd=ROOT, check=True, capture_output=True,
                   timeout=120)
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == ["split"]
    assert list((tmp_path / "work" / "split" / "train").glob("*/*")) and list((tmp_path / "work" / "split" / "val").glob("*/*"))
