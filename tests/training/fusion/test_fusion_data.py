"""Pair manifests: JSONL and CSV loading, a pair with a missing side, and clear errors for bad rows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from training.fusion.data import load_pairs
from training.image.data import DataError


def _rows(subset: Path, count: int) -> list[dict[str, str]]:
    return [json.loads(line) for line in (subset / "train.jsonl").read_text().splitlines()[:count]]


def _write_jsonl(folder: Path, rows: list[dict[str, object]], subset: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "images").exists():
        shutil.copytree(subset / "images", folder / "images")
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_loads_the_shared_jsonl_layout_decoded_to_the_requested_size(pairs_subset: Path) -> None:
    data = load_pairs(pairs_subset, image_size=32, cache_dir=None)
    assert len(data) == 600
    assert data.classes == ["negative", "neutral", "positive"]
    assert data.images.shape == (600, 3, 32, 32) and data.images.dtype == torch.uint8
    assert bool(data.has_image.all()) and bool(data.has_text.all())
    assert data.images.float().std() > 10  # real photos, not zeros
    assert len(data.fingerprint) == 64
    assert load_pairs(pairs_subset, image_size=48, cache_dir=None).images.shape[2:] == (48, 48)


def test_csv_with_the_same_columns_loads_the_same_pairs(pairs_subset: Path, tmp_path: Path) -> None:
    rows = _rows(pairs_subset, 20)
    jsonl = _write_jsonl(tmp_path / "d", rows, pairs_subset)  # type: ignore[arg-type]
    with open(tmp_path / "d" / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    from_csv = load_pairs(tmp_path / "d" / "pairs.csv", 32, cache_dir=None)
    from_jsonl = load_pairs(jsonl, 32, cache_dir=None)
    assert from_csv.ids == from_jsonl.ids and from_csv.texts == from_jsonl.texts
    assert torch.equal(from_csv.images, from_jsonl.images) and torch.equal(from_csv.labels, from_jsonl.labels)


def test_a_pair_may_lack_its_image_or_its_text(pairs_subset: Path, tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [dict(row) for row in _rows(pairs_subset, 3)]
    rows[0]["image"] = None
    rows[1]["text"] = "   "
    data = load_pairs(_write_jsonl(tmp_path / "d", rows, pairs_subset), 32, cache_dir=None)
    assert data.has_image.tolist() == [False, True, True]
    assert data.has_text.tolist() == [True, False, True]
    assert int(data.images[0].abs().sum()) == 0 and data.texts[1] == ""


@pytest.mark.parametrize(("edit", "message"), [
    (lambda row: row.pop("label"), r"jsonl:2: missing column\(s\) \['label'\]"),
    (lambda row: row.update(image="images/nope.jpg"), r"jsonl:2: image file 'images/nope.jpg' not found"),
    (lambda row: row.update(image="../../etc/passwd"), "leaves the data folder"),
    (lambda row: row.update(image="", text=""), "has neither an image nor a text"),
    (lambda row: row.update(label=""), "'label' must be a non-empty string"),
    (lambda row: row.update(text=5), "'text' must be a string"),
])
def test_bad_rows_are_refused_with_the_line_and_the_reason(pairs_subset: Path, tmp_path: Path, edit, message: str) -> None:
    rows: list[dict[str, object]] = [dict(row) for row in _rows(pairs_subset, 3)]
    edit(rows[1])
    with pytest.raises(DataError, match=message):
        load_pairs(_write_jsonl(tmp_path / "d", rows, pairs_subset), 32, cache_dir=None)


def test_unknown_labels_duplicate_ids_and_broken_files_are_refused(pairs_subset: Path, tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [dict(row) for row in _rows(pairs_subset, 3)]
    path = _write_jsonl(tmp_path / "d", rows, pairs_subset)
    with pytest.raises(DataError, match="unknown label 'positive'"):
        load_pairs(path, 32, classes=["negative", "neutral"], cache_dir=None)
    _write_jsonl(tmp_path / "d", [*rows, rows[0]], pairs_subset)
    with pytest.raises(DataError, match="jsonl:4: duplicate id"):
        load_pairs(path, 32, cache_dir=None)
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="jsonl:2: not valid JSON"):
        load_pairs(path, 32, cache_dir=None)
    (tmp_path / "d" / "images" / f"{rows[0]['id']}.jpg").write_bytes(b"\xff\xd8 truncated")
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match="unreadable image"):
        load_pairs(path, 32, cache_dir=None)
    (tmp_path / "d" / "bad.csv").write_text("id,text,label\n1,hi,positive\n")
    with pytest.raises(DataError, match=r"header lacks column\(s\) \['image'\]"):
        load_pairs(tmp_path / "d" / "bad.csv", 32, cache_dir=None)
    with pytest.raises(DataError, match=r"no train\.jsonl or train\.csv"):
        load_pairs(tmp_path, 32, cache_dir=None)
