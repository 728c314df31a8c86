"""Labelled text data sets: loading (bydate tree, CSV, JSONL), splits and the token cache.

Accepted layouts (class names are the folder names / label values, sorted):

* a folder tree ``root/<class>/<file>`` (the 20 Newsgroups ``bydate`` layout), files read as latin-1;
* a ``.csv`` file with a header row holding ``text`` and ``label`` columns (UTF-8);
* a ``.jsonl`` file, one JSON object a line with string ``text`` and string or integer ``label``.

A bad row (missing or empty text or label, broken JSON, unknown label) is a ``DataError`` naming the
file and line. Token lists are cached on disk under ``.cache/text-tokens`` keyed by the data
fingerprint and the tokenisation settings, so a second run does not tokenise again.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from models.text_encoding import TextPreprocessing, tokenize
from training.engine.atomic import atomic_output
from training.image.data import DataError

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_CACHE = Path(".cache") / "text-tokens"
TEXT_SUFFIXES = (".csv", ".jsonl")


@dataclasses.dataclass
class TextDataset:
    texts: list[str]
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> TextDataset:
        index_list = [int(i) for i in indices]
        return TextDataset([self.texts[i] for i in index_list], self.labels[index_list], self.classes,
                           self.fingerprint)


def _fingerprint(texts: Sequence[str], labels: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(label.encode("utf-8", "surrogatepass") + b"\x00")
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x01")
    return digest.hexdigest()


def _build(texts: list[str], names: list[str], source: Path, classes: Sequence[str] | None) -> TextDataset:
    if not texts:
        raise DataError(f"{source}: no examples")
    if classes is None:
        classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise DataError(f"{source}: labels {unknown[:5]} are not among the classes {list(classes)}")
    labels = torch.tensor([index[name] for name in names], dtype=torch.int64)
    return TextDataset(texts, labels, list(classes), _fingerprint(texts, names))


def load_text_folder(root: Path, classes: Sequence[str] | None = None) -> TextDataset:
    """``root/<class>/<file>``: one class per folder, one example per file (latin-1)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<text files>)")
    texts, names = [], []
    for folder in folders:
        files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: (len(p.name), p.name))
        if not files:
            raise DataError(f"{folder}: class folder {folder.name!r} holds no text files")
        for path in files:
            texts.append(path.read_bytes().decode("latin-1"))
            names.append(folder.name)
    return _build(texts, names, root, classes)


def _check_row(text: object, label: object, where: str) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: missing or empty 'text'")
    if isinstance(label, bool) or not isinstance(label, str | int) or (isinstance(label, str) and not label.strip()):
        raise DataError(f"{where}: missing or empty 'label' (a string or an integer)")
    return text, str(label).strip()


def load_text_csv(path: Path, classes: Sequence[str] | None = None) -> TextDataset:
    """A CSV file with a header row naming ``text`` and ``label`` columns."""
    texts, names = [], []
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            if "text" not in fields or "label" not in fields:
                raise DataError(f"{path}: the header must name 'text' and 'label' columns (found {fields})")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise DataError(f"{where}: more fields than the header has")
                text, label = _check_row(row.get("text"), row.get("label"), where)
                texts.append(text)
                names.append(label)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 ({error})") from None
    except csv.Error as error:
        raise DataError(f"{path}: malformed CSV ({error})") from None
    return _build(texts, names, path, classes)


def load_text_jsonl(path: Path, classes: Sequence[str] | None = None) -> TextDataset:
    """One JSON object a line: ``{"text": "...", "label": "..."}``; blank lines are skipped."""
    texts, names = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with 'text' and 'label'")
        text, label = _check_row(row.get("text"), row.get("label"), where)
        texts.append(text)
        names.append(label)
    return _build(texts, names, path, classes)


def load_text_data(path: str | Path, classes: Sequence[str] | None = None) -> TextDataset:
    """Any accepted layout; ``classes`` fixes the label order (e.g. a checkpoint's classes)."""
    path = Path(path)
    if path.is_dir():
        return load_text_folder(path, classes)
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix.lower() == ".csv":
        return load_text_csv(path, classes)
    if path.suffix.lower() == ".jsonl":
        return load_text_jsonl(path, classes)
    raise DataError(f"{path}: expected a folder per class, a .csv or a .jsonl file")


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_indices, validation_indices), ``fraction`` of each class held out (fixed seed)."""
    from training.image.data import stratified_split as split

    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be between 0 and 1, got {fraction}")
    return split(labels, fraction, seed)


def label_budget(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Positions of a stratified ``fraction`` of ``labels`` (at least one per class)."""
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        kept.append(members[: max(1, round(len(members) * fraction))])
    return torch.cat(kept).sort().values


def cached_tokens(data: TextDataset, preprocessing: TextPreprocessing,
                  cache_dir: Path | Literal["default"] | None = "default") -> list[list[str]]:
    """Token lists of every text in ``data``, read from / written to the on-disk cache.

    ``cache_dir``: ``"default"`` is ``DEFAULT_TOKEN_CACHE`` (looked up at call time), ``None`` no cache.
    """
    import spacy

    if cache_dir == "default":
        cache_dir = DEFAULT_TOKEN_CACHE

    key = hashlib.sha256(f"{data.fingerprint}\n{preprocessing.cache_key()}\nspacy {spacy.__version__}".encode())
    path = cache_dir / f"tokens-{key.hexdigest()[:20]}.json.gz" if cache_dir else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            tokens: list[list[str]] = json.load(handle)
        if len(tokens) == len(data):
            logger.info("read %d tokenised texts from %s", len(tokens), path)
            return tokens
    started = time.perf_counter()
    tokens = tokenize(data.texts, preprocessing)
    seconds = time.perf_counter() - started
    logger.info("tokenised %d texts in %.1f s (%.0f posts/s)", len(data), seconds, len(data) / max(seconds, 1e-9))
    if path is not None:
        with atomic_output(path) as raw, gzip.open(raw, "wt", encoding="utf-8", compresslevel=3) as handle:
            json.dump(tokens, handle, ensure_ascii=False)
    return tokens
