"""Text training adapts to a small data set: calibration on out-of-fold scores of every post."""

from __future__ import annotations

import csv
from pathlib import Path

from models.checkpoint import read_manifest
from training.cli import main


def test_train_text_on_a_small_csv_cross_fits_its_calibration(news_subset: Path, tmp_path: Path) -> None:
    rows = [(path.read_text(encoding="latin-1"), folder.name)
            for folder in sorted(news_subset.iterdir()) for path in sorted(folder.iterdir())[:25]]
    table = tmp_path / "posts.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    assert main(["train-text", "--data", str(table), "--output", str(tmp_path / "news")]) == 0
    validation = read_manifest(tmp_path / "news").metrics["validation"]
    assert validation["calibration_folds"] == 5 and validation["refit_full"] is True
    assert validation["count"] == len(rows)  # calibrated on out-of-fold scores of every post
