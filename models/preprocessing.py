"""The image preprocessing a checkpoint carries, as one typed object shared by training and serving.

``ImagePreprocessing`` is the ``preprocessing`` entry of an image manifest (and the ``image`` entry
of a multimodal one, read through ``models.fusion.fusion_preprocessing``): the square input size,
the per-channel mean and std on the 0–1 scale, the colour mode and the resampling filter. It is read
strictly (``from_manifest``, ``from_dict``), written back as the same plain dict (``to_dict``), fitted
to training images (``from_images``), and owns the one standardisation of uint8 pixels
(``normalize``), so the service feeds a model exactly what it was trained on. The text side's
counterpart is ``models.text_encoding.TextPreprocessing``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from models.checkpoint import CheckpointError, Manifest

KIND = "image"
CHANNELS = 3
COLORS = ("RGB",)
RESIZE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")
_REQUIRED = ("size", "mean", "std")


class ImagePreprocessingError(CheckpointError, ValueError):
    """Image preprocessing settings that cannot be used: a bad manifest entry, or bad values in code."""


def _channel_values(name: str, values: Any, positive: bool) -> tuple[float, ...]:
    """``values`` as a tuple of one finite number per channel (positive ones, if asked)."""
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != CHANNELS:
        raise ImagePreprocessingError(f"image preprocessing: {name} must be {CHANNELS} numbers (one per RGB channel, "
                                      f"0–1 scale), got {values!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ImagePreprocessingError(f"image preprocessing: {name} must hold finite numbers, got {values!r}")
        if positive and value <= 0:
            raise ImagePreprocessingError(f"image preprocessing: {name} must be positive, got {values!r}")
    return tuple(float(value) for value in values)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    size: int  # images are resized to size × size
    mean: tuple[float, ...]  # per channel, 0–1 scale
    std: tuple[float, ...]  # per channel, 0–1 scale
    color: str = "RGB"
    resize: str = "bilinear"  # the resampling filter, one of RESIZE_FILTERS

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ImagePreprocessingError(f"image preprocessing: size must be a positive integer, got {self.size!r}")
        object.__setattr__(self, "mean", _channel_values("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _channel_values("std", self.std, positive=True))
        if self.color not in COLORS:
            raise ImagePreprocessingError(f"image preprocessing: color {self.color!r} is not one of {list(COLORS)}")
        if self.resize not in RESIZE_FILTERS:
            raise ImagePreprocessingError(f"image preprocessing: resize {self.resize!r} is not one of "
                                          f"{list(RESIZE_FILTERS)}")

    @classmethod
    def from_images(cls, images: torch.Tensor, size: int) -> ImagePreprocessing:
        """Standardisation fitted to training images, uint8 (N, 3, H, W): per-channel mean and std."""
        floats = images.float().div_(255)
        return cls(size, tuple(floats.mean(dim=(0, 2, 3)).tolist()), tuple(floats.std(dim=(0, 2, 3)).tolist()))

    @classmethod
    def from_dict(cls, values: Any) -> ImagePreprocessing:
        """Read a manifest's image preprocessing entry strictly: unknown or missing fields are errors."""
        if not isinstance(values, dict):
            raise ImagePreprocessingError(f"image preprocessing must be a JSON object, got {values!r}")
        values = dict(values)
        kind = values.pop("kind", None)
        if kind != KIND:
            raise ImagePreprocessingError(f"image preprocessing kind {kind!r} is not {KIND!r}")
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ImagePreprocessingError(f"unknown image preprocessing fields {unknown}; known: {['kind', *known]}")
        missing = [name for name in _REQUIRED if name not in values]
        if missing:
            raise ImagePreprocessingError(f"image preprocessing lacks {missing}")
        return cls(**values)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ImagePreprocessing:
        """The preprocessing of an image checkpoint (a multimodal one's: ``models.fusion.fusion_preprocessing``)."""
        if manifest.task != KIND:
            raise ImagePreprocessingError(f"checkpoint {manifest.name!r} is a {manifest.task} checkpoint, not an image one")
        try:
            return cls.from_dict(manifest.preprocessing)
        except ImagePreprocessingError as error:
            raise ImagePreprocessingError(f"checkpoint {manifest.name!r}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The manifest's plain form, in the order training has always written it."""
        return {"kind": KIND, "size": self.size, "mean": list(self.mean), "std": list(self.std), "color": self.color,
                "resize": self.resize}

    def scales(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, 1, 1) mean and std on the 0–255 scale, on ``device``: what ``normalize`` subtracts and
        divides by. A server makes them once per model instead of once per batch."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1) * 255
        return mean, std

    def normalize(self, images: torch.Tensor,
                  scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """uint8 (B, 3, S, S) → float32 (B, 3, S, S), standardised per channel: (pixel − 255·mean) / (255·std).

        ``scales`` are ``self.scales(images.device)``, made here unless given."""
        mean, std = scales if scales is not None else self.scales(images.device)
        return (images.float() - mean) / std
