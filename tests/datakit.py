"""Small real subsets of the shared data sets (../shared/data), extracted for tests.

Each extractor skips the calling test when the shared archive is missing.
"""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NEWS_CLASSES = ("comp.graphics", "rec.sport.hockey", "sci.space", "talk.religion.misc")


def _extract_per_class(archive_name: str, destination: Path, per_class: int, classes: tuple[str, ...] | None,
                       class_count: int) -> Path:
    """The first ``per_class`` files of each class folder (of ``classes``, or all) of a shared archive."""
    archive = SHARED_DATA / archive_name
    if not archive.is_file():
        pytest.skip(f"shared data missing: {archive}")
    taken: dict[str, int] = defaultdict(int)
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if (not member.isfile() or len(parts) < 3 or (classes is not None and parts[-2] not in classes)
                    or taken[parts[-2]] >= per_class):
                continue
            taken[parts[-2]] += 1
            target = destination / parts[-2] / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
            if len(taken) == class_count and all(count >= per_class for count in taken.values()):
                break
    return destination


def extract_cifar_subset(destination: Path, per_class: int) -> Path:
    """Extract the first ``per_class`` JPEGs of every class of the shared CIFAR-10 training split."""
    return _extract_per_class("cifar10-jpeg-train.tar.gz", destination, per_class, None, class_count=10)


def extract_news_subset(destination: Path, per_class: int, classes: tuple[str, ...] = NEWS_CLASSES) -> Path:
    """The first ``per_class`` posts of each of ``classes`` from the shared bydate training archive."""
    return _extract_per_class("20news-bydate-train.tar.gz", destination, per_class, classes, len(classes))


def extract_pairs_subset(destination: Path, pairs: int) -> Path:
    """The first ``pairs`` pairs (by image order in the archive) of the shared paired training data."""
    archive = SHARED_DATA / "mvsa-pairs-train.tar.gz"
    if not archive.is_file():
        pytest.skip(f"shared data missing: {archive}")
    images: dict[str, bytes] = {}
    lines: list[str] = []
    with tarfile.open(archive) as tar:
        for member in tar:
            path = Path(member.name)
            if not member.isfile():
                continue
            source = tar.extractfile(member)
            assert source is not None
            if path.name == "train.jsonl":
                lines = source.read().decode("utf-8").splitlines()
            elif path.parent.name == "images" and len(images) < pairs:
                images[path.stem] = source.read()
            if lines and len(images) >= pairs:
                break
    (destination / "images").mkdir(parents=True)
    kept = []
    for line in lines:
        row = json.loads(line)
        if row["id"] in images:
            (destination / "images" / f"{row['id']}.jpg").write_bytes(images[row["id"]])
            kept.append(line)
    (destination / "train.jsonl").write_text("\n".join(kept) + "\n")
    return destination
