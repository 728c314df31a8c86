"""Paired image + text data sets for fusion: manifest loading, decoding, splitting.

Accepted layouts (the user's own paired data):

* a ``.jsonl`` file, one JSON object a line, or a ``.csv`` file with a header row, both with the
  columns ``id``, ``image``, ``text`` and ``label``;
* a folder holding ``train.jsonl`` (or ``train.csv``), as the shared ``mvsa-pairs-train/`` does.

``image`` is a path relative to the manifest's folder. A pair may lack one side: an empty (or JSON
``null``) ``image`` or ``text`` marks that modality missing, which the fusion models accept. A bad
row is a ``DataError`` naming the file and line: a missing column, both sides empty, an empty or
unknown label, a duplicate id, an image path leaving the data folder, a missing or unreadable image.

Images are decoded once into memory as uint8 (N, 3, S, S), converted to RGB and resized to the
square size of the image model's preprocessing with bilinear resampling, exactly as the service's
``image_to_tensor`` does; missing images are zeros with ``has_image`` False.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from training.engine.atomic import atomic_output
from training.image.data import DEFAULT_CACHE, DataError, decode_image

logger = logging.getLogger(__name__)

COLUMNS = ("id", "image", "text", "label")
MANIFEST_NAMES = ("train.jsonl", "train.csv")


@dataclasses.dataclass
class PairRecord:
    id: str
    image: Path | None  # absolute path, None when the pair has no image
    text: str | None  # None when the pair has no text
    label: str
    line: int


@dataclasses.dataclass
class PairDataset:
    ids: list[str]
    texts: list[str]  # "" where has_text is False
    images: torch.Tensor  # (N, 3, S, S) uint8, zeros where has_image is False
    has_image: torch.Tensor  # (N,) bool
    has_text: torch.Tensor  # (N,) bool
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> PairDataset:
        index = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        return PairDataset(
            [self.ids[i] for i in index.tolist()], [self.texts[i] for i in index.tolist()], self.images[index],
            self.has_image[index], self.has_text[index], self.labels[index], self.classes, self.fingerprint,
        )


def find_manifest(path: str | Path) -> Path:
    """The JSONL/CSV manifest at ``path``, or ``train.jsonl``/``train.csv`` inside a folder."""
    path = Path(path)
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path}: no {' or '.join(MANIFEST_NAMES)} in this folder")
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise DataError(f"{path}: expected a .jsonl or .csv manifest with columns {', '.join(COLUMNS)}")
    return path


def _folder(path: Path) -> Path:
    """Absolute and normalised, symlinks kept."""
    return Path(os.path.normpath(path.absolute()))


def _optional(value: object, column: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} must be a string, got {type(value).__name__}")
    return value if value.strip() else None


def _record(values: dict[str, object], root: Path, where: str, line: int) -> PairRecord:
    missing = [column for column in COLUMNS if column not in values]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; every row needs {list(COLUMNS)}")
    identifier = values["id"]
    if isinstance(identifier, int) and not isinstance(identifier, bool):
        identifier = str(identifier)
    if not isinstance(identifier, str) or not identifier.strip():
        raise DataError(f"{where}: 'id' must be a non-empty string")
    label = values["label"]
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"{where}: 'label' must be a non-empty string")
    image_name = _optional(values["image"], "image", where)
    text = _optional(values["text"], "text", where)
    if image_name is None and text is None:
        raise DataError(f"{where}: pair {identifier!r} has neither an image nor a text")
    image_path = None
    if image_name is not None:
        # lexical check (a symlinked images folder is fine; '../' and absolute paths are not)
        image_path = Path(os.path.normpath(_folder(root) / image_name))
        if not image_path.is_relative_to(_folder(root)):
            raise DataError(f"{where}: image path {image_name!r} leaves the data folder {root}")
        if not image_path.is_file():
            raise DataError(f"{where}: image file {image_name!r} not found (looked for {image_path})")
    return PairRecord(identifier, image_path, text, label.strip(), line)


def read_records(manifest: Path) -> list[PairRecord]:
    """Every row of a JSONL or CSV pair manifest, validated; paths resolved against its folder."""
    root = manifest.parent
    records: list[PairRecord] = []
    try:
        if manifest.suffix.lower() == ".jsonl":
            with open(manifest, encoding="utf-8") as handle:
                for line, raw in enumerate(handle, start=1):
                    if not raw.strip():
                        continue
                    where = f"{manifest}:{line}"
                    try:
                        values = json.loads(raw)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{where}: not valid JSON ({error.msg})") from None
                    if not isinstance(values, dict):
                        raise DataError(f"{where}: each line must be a JSON object with {list(COLUMNS)}")
                    records.append(_record(values, root, where, line))
        else:
            with open(manifest, encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle)
                header = reader.fieldnames or []
                absent = [column for column in COLUMNS if column not in header]
                if absent:
                    raise DataError(f"{manifest}: header lacks column(s) {absent}; it needs {list(COLUMNS)}")
                for row in reader:
                    where = f"{manifest}:{reader.line_num}"
                    if None in row or any(value is None for value in row.values()):
                        raise DataError(f"{where}: wrong number of fields for the header {header}")
                    records.append(_record(dict(row), root, where, reader.line_num))
    except UnicodeDecodeError as error:
        raise DataError(f"{manifest}: not UTF-8 ({error})") from None
    if not records:
        raise DataError(f"{manifest}: no pairs")
    seen: dict[str, int] = {}
    for record in records:
        if record.id in seen:
            raise DataError(f"{manifest}:{record.line}: duplicate id {record.id!r} (first on line {seen[record.id]})")
        seen[record.id] = record.line
    return records


def _fingerprint(manifest: Path, records: Sequence[PairRecord], size: int) -> str:
    digest = hashlib.sha256(f"{size}\n".encode())
    for record in records:
        image = b""
        if record.image is not None:
            image = f"{record.image.relative_to(_folder(manifest.parent))}:{record.image.stat().st_size}".encode()
        digest.update(b"\x00".join([record.id.encode(), image, (record.text or "").encode("utf-8", "replace"),
                                    record.label.encode()]) + b"\x01")
    return digest.hexdigest()


def _decode_all(records: Sequence[PairRecord], image_size: int) -> np.ndarray:
    images = np.zeros((len(records), 3, image_size, image_size), dtype=np.uint8)  # (N, 3, S, S)
    with_image = [i for i, record in enumerate(records) if record.image is not None]
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = pool.map(lambda i: decode_image(records[i].image, image_size), with_image)  # type: ignore[arg-type]
        for i, array in zip(with_image, decoded, strict=True):
            images[i] = array
    return images


def load_pairs(path: str | Path, image_size: int, classes: Sequence[str] | None = None,
               cache_dir: Path | None = DEFAULT_CACHE) -> PairDataset:
    """Load and decode a pair manifest. ``classes`` fixes the label order (unknown labels are errors).

    Decoded images are cached as ``.npy`` in ``cache_dir`` keyed by the data fingerprint (None: no cache).
    """
    manifest = find_manifest(path)
    records = read_records(manifest)
    names = [record.label for record in records]
    if classes is None:
        classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    for record in records:
        if record.label not in index:
            raise DataError(f"{manifest}:{record.line}: unknown label {record.label!r}; classes are {list(classes)}")
    fingerprint = _fingerprint(manifest, records, image_size)
    cached = cache_dir / f"pairs-{fingerprint[:16]}.npy" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        images = np.load(cached)
    else:
        images = _decode_all(records, image_size)
        if cached is not None:
            with atomic_output(cached) as handle:
                np.save(handle, images)
    dataset = PairDataset(
        ids=[record.id for record in records],
        texts=[record.text or "" for record in records],
        images=torch.from_numpy(images),
        has_image=torch.tensor([record.image is not None for record in records]),
        has_text=torch.tensor([record.text is not None for record in records]),
        labels=torch.tensor([index[name] for name in names], dtype=torch.int64),
        classes=list(classes),
        fingerprint=fingerprint,
    )
    logger.info("loaded %d pairs from %s (%d without image, %d without text), classes %s", len(dataset), manifest,
                int((~dataset.has_image).sum()), int((~dataset.has_text).sum()), dataset.classes)
    return dataset
