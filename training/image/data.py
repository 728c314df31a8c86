"""Image data sets decoded once into memory, and augmentation on tensors.

Reads an ImageFolder tree (``root/<class>/<image>``; class names are the folder names, sorted) or
the original CIFAR-10 python-batch folder (``data_batch_1`` … plus ``batches.meta``). Decoded
arrays are cached as ``.npy`` beside a small JSON index in a cache folder, keyed by a fingerprint of
the file list, so a second run skips decoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from training.engine.atomic import atomic_output

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_CACHE = Path(".cache") / "decoded"


class DataError(Exception):
    """A data set that cannot be read: missing path, empty class folder, unreadable image."""


@dataclasses.dataclass
class ImageDataset:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[indices], self.labels[indices], self.classes, self.fingerprint)


def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        members = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not members:
            raise DataError(f"{root / name}: class folder {name!r} holds no images")
        files.extend((p, index) for p in members)
    return classes, files


def decode_image(path: Path, size: int) -> np.ndarray:
    """RGB, resized to (size, size) bilinear — the service's ``image_to_tensor`` rule — as (3, S, S) uint8."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable image ({error})") from None


def load_image_folder(root: str | Path, size: int = 32, cache_dir: Path | None = DEFAULT_CACHE) -> ImageDataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    if (root / "batches.meta").is_file():
        return load_cifar_batches(root)
    classes, files = _list_image_folder(root)
    listing = "\n".join(f"{p.relative_to(root)}:{p.stat().st_size}:{label}" for p, label in files)
    fingerprint = hashlib.sha256(f"{size}\n{listing}".encode()).hexdigest()
    cached = cache_dir / f"images-{fingerprint[:16]}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        array = np.load(cached)
    else:
        with ThreadPoolExecutor() as pool:
            array = np.stack(list(pool.map(lambda item: decode_image(item[0], size), files)))
        if cached is not None:
            with atomic_output(cached) as handle:  # torchrun's ranks both write it
                np.save(handle, array)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageDataset(torch.from_numpy(array), labels, classes, fingerprint)


def load_cifar_batches(root: Path) -> ImageDataset:
    """The original CIFAR-10 python version (``data_batch_1..5`` and ``batches.meta``)."""
    batch_files = sorted(root.glob("data_batch_*"))
    if not batch_files:
        raise DataError(f"{root}: batches.meta but no data_batch_* files")
    with open(root / "batches.meta", "rb") as handle:
        classes = [c.decode() if isinstance(c, bytes) else c for c in pickle.load(handle, encoding="bytes")[b"label_names"]]  # noqa: S301
    images, labels = [], []
    digest = hashlib.sha256()
    for path in batch_files:
        raw = path.read_bytes()
        digest.update(raw)
        batch = pickle.loads(raw, encoding="bytes")  # noqa: S301 — the published CIFAR format
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    return ImageDataset(torch.from_numpy(np.concatenate(images)), torch.tensor(labels), classes, digest.hexdigest())


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_indices, validation_indices) with ``fraction`` of every class held out."""
    generator = torch.Generator().manual_seed(seed)
    train, validation = [], []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held = round(len(members) * fraction)
        validation.append(members[:held])
        train.append(members[held:])
    return torch.cat(train).sort().values, torch.cat(validation).sort().values


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True,
            flips: torch.Tensor | None = None) -> torch.Tensor:
    """Random translation (reflect-padded crop) and horizontal flip of a (B, C, H, W) batch.

    ``flips`` (B,) bool chooses which images are mirrored instead of a coin toss per image.
    """
    batch, _, height, width = images.shape
    if flip:
        if flips is None:
            flips = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
    if pad > 0:
        padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
        dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        rows = (dy.view(-1, 1) + torch.arange(height).view(1, -1))  # (B, H)
        cols = (dx.view(-1, 1) + torch.arange(width).view(1, -1))  # (B, W)
        index = torch.arange(batch).view(-1, 1, 1, 1)
        channels = torch.arange(images.shape[1]).view(1, -1, 1, 1)
        images = padded[index, channels, rows.view(batch, 1, height, 1), cols.view(batch, 1, 1, width)]
    return images


def write_json(path: Path, values: object) -> None:
    with atomic_output(path) as handle:
        handle.write((json.dumps(values, indent=2) + "\n").encode())
