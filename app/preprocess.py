"""Untrusted image bytes → the uint8 (3, S, S) tensor a checkpoint's preprocessing expects.

The format is recognised from the bytes (magic numbers), never from a file name or declared
content type. JPEG, PNG, WebP, BMP and GIF (first frame) are accepted; any mode is converted to
RGB (16-bit scaled to 8-bit, palette and CMYK converted, transparency composited on white).
Images larger than ``max_pixels`` are refused from their header, before any pixel is decoded
(decompression bombs). Pure functions, meant to run in a thread pool off the event loop.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from app.errors import InvalidImage, PayloadTooLarge, UnsupportedFormat

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_BACKGROUND = (255, 255, 255)


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's own bomb check match ours (it raises beyond 2× its limit, warns beyond 1×)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name of ``data`` from its leading bytes, or None if it is none we accept."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow clips wide integers to 255 when converting; scale them instead.
        array = np.asarray(image)
        array = np.clip(array, 0, 255) if mode == "F" else np.clip(array.astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, _BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation if there is a readable one; a broken EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def decode_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode ``data`` to an RGB image; typed errors for empty, unsupported, too large or broken input."""
    if not data:
        raise InvalidImage("the file is empty")
    image_format = sniff_format(data)
    if image_format is None:
        raise UnsupportedFormat("unsupported image format: send JPEG, PNG, WebP, BMP or GIF "
                                "(the format is recognised from the bytes)")
    name = "WebP" if image_format == "WEBP" else image_format
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format])
        width, height = image.size
        if width * height > max_pixels:
            raise PayloadTooLarge(f"image is too large ({width}×{height} pixels): at most {max_pixels:,} pixels "
                                  "are accepted (decompression-bomb guard)")
        if draft_size is not None and image_format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))  # let libjpeg downscale large photos while decoding
        image.seek(0)
        image.load()
        return _to_rgb(_upright(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise PayloadTooLarge(f"image is too large: at most {max_pixels:,} pixels are accepted "
                              f"(decompression-bomb guard: {error})") from None
    except (PayloadTooLarge, UnsupportedFormat):
        raise
    except Exception as error:  # any failure to decode untrusted bytes is the input's fault
        reason = str(error) or type(error).__name__
        raise InvalidImage(f"cannot decode the {name} image (truncated or corrupt?): {reason}") from None


def image_to_tensor(image: Image.Image, preprocessing: dict[str, Any]) -> torch.Tensor:
    """RGB image → uint8 (3, S, S), resized as the checkpoint's ``preprocessing`` says."""
    size = int(preprocessing["size"])
    resample = RESAMPLING.get(str(preprocessing.get("resize", "bilinear")), Image.Resampling.BILINEAR)
    if image.size != (size, size):
        image = image.resize((size, size), resample)
    array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # (3, S, S)


def prepare_image(data: bytes, preprocessing: dict[str, Any], max_pixels: int) -> torch.Tensor:
    """Untrusted bytes → uint8 (3, S, S); raises ``ServiceError`` subclasses for bad input."""
    size = int(preprocessing["size"])
    return image_to_tensor(decode_image(data, max_pixels, draft_size=size), preprocessing)
