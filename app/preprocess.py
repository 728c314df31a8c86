"""Untrusted image bytes → the uint8 (3, S, S) tensor a checkpoint's preprocessing expects.

The format is recognised from the bytes (magic numbers), never from a file name or declared
content type. Accepted are the formats whose decoding cost is bounded by their pixel count, decoded
by C code: JPEG, PNG, WebP, GIF (first frame) and uncompressed BMP. Refused (415): everything else,
TIFF included (a zoo of codecs), and BMP with RLE compression, which Pillow expands in Python row by
row, so that a few kilobytes cost as much as a huge image. Any mode is converted to RGB (16-bit
scaled to 8-bit, palette and CMYK converted, transparency composited on white).

Every image is sized from its header before any pixel is decoded (``open_image``): larger than
``max_pixels`` is a 413 (decompression bombs), and a request's images together may decode at most
``MAX_REQUEST_PIXELS``. A JPEG much larger than the model's input is decoded at reduced scale
(libjpeg's DCT scaling, up to 1/8 a side), and counted at that scale. Pure functions, meant to run in
a thread pool off the event loop.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from app.errors import InvalidImage, PayloadTooLarge, ServiceError, UnsupportedFormat
from models.preprocessing import ImagePreprocessing

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
RESAMPLING = {  # a filter for each of models.preprocessing.RESIZE_FILTERS
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


def _bmp_compression(data: bytes) -> int:
    """The BMP's compression field (0 BI_RGB, 1 RLE8, 2 RLE4, 3 BI_BITFIELDS…); 0 for an old OS/2 header."""
    header_size = int.from_bytes(data[14:18], "little")
    return int.from_bytes(data[30:34], "little") if header_size >= 40 and len(data) >= 34 else 0


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow clips wide integers to 255 when converting; scale them instead (in the image's own
        # width: 16-bit stays 16-bit, never a wider copy of a large image).
        array = np.asarray(image)
        if mode == "F":
            array = np.clip(array, 0, 255)
        elif array.dtype.kind == "u":  # unsigned 16-bit, either byte order
            array = array >> 8
        else:
            array = np.clip(array, 0, 65535) >> 8
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


@contextlib.contextmanager
def _reading(name: str, max_pixels: int) -> Iterator[None]:
    """Pillow's failures on untrusted bytes as the typed errors the API answers with."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise PayloadTooLarge(f"image is too large: at most {max_pixels:,} pixels are accepted "
                              f"(decompression-bomb guard: {error})") from None
    except Exception as error:  # any failure to read untrusted bytes is the input's fault
        reason = str(error) or type(error).__name__
        raise InvalidImage(f"cannot decode the {name} image (truncated or corrupt?): {reason}") from None


def open_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> tuple[Image.Image, int]:
    """Open ``data`` lazily (only its header is read) → the image and the pixels decoding will cost.

    Typed errors for empty, unsupported or too large input; no pixel is decoded here."""
    if not data:
        raise InvalidImage("the file is empty")
    image_format = sniff_format(data)
    if image_format is None:
        raise UnsupportedFormat("unsupported image format: send JPEG, PNG, WebP, BMP or GIF "
                                "(the format is recognised from the bytes)")
    if image_format == "BMP" and _bmp_compression(data) in (1, 2):
        raise UnsupportedFormat("BMP with RLE compression is not accepted (its decoding is slow for its size): "
                                "send an uncompressed BMP, or PNG")
    name = "WebP" if image_format == "WEBP" else image_format
    with _reading(name, max_pixels):
        image = Image.open(io.BytesIO(data), formats=[image_format])
        width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is too large ({width}×{height} pixels): at most {max_pixels:,} pixels "
                              "are accepted (MAX_IMAGE_PIXELS; decompression-bomb guard)")
    if draft_size is not None and image_format == "JPEG":
        try:
            image.draft("RGB", (draft_size, draft_size))  # let libjpeg downscale large photos while decoding
        except Exception as error:
            raise InvalidImage(f"cannot decode the JPEG image (truncated or corrupt?): {error}") from None
        width, height = image.size  # the reduced scale it will decode at
    return image, width * height


def load_image(image: Image.Image, max_pixels: int) -> Image.Image:
    """Decode an image from ``open_image`` to RGB; typed errors for broken input."""
    with _reading("WebP" if image.format == "WEBP" else str(image.format), max_pixels):
        image.seek(0)
        image.load()
        return _to_rgb(_upright(image))


def decode_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode ``data`` to an RGB image; typed errors for empty, unsupported, too large or broken input."""
    return load_image(open_image(data, max_pixels, draft_size)[0], max_pixels)


def named_error(error: ServiceError, name: str) -> ServiceError:
    """``error`` with its message prefixed by the input's name ("image 2 (cat.png): …")."""
    renamed = type(error).__new__(type(error))
    ServiceError.__init__(renamed, f"{name}: {error.detail}", error.headers)
    return renamed


def check_request_pixels(pixels: int, budget: int) -> None:
    """413 when a request's images together would decode more than ``budget`` pixels."""
    if pixels > budget:
        raise PayloadTooLarge(f"the images of this request are too large together ({pixels:,} pixels to decode): "
                              f"at most {budget:,} per request are accepted (MAX_REQUEST_PIXELS); send fewer or "
                              "smaller images")


def image_to_tensor(image: Image.Image, preprocessing: ImagePreprocessing) -> torch.Tensor:
    """RGB image → uint8 (3, S, S), resized as the checkpoint's ``preprocessing`` says."""
    size = preprocessing.size
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLING[preprocessing.resize])
    array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # (3, S, S)


def prepare_image(data: bytes, preprocessing: ImagePreprocessing, max_pixels: int) -> torch.Tensor:
    """Untrusted bytes → uint8 (3, S, S); raises ``ServiceError`` subclasses for bad input."""
    return image_to_tensor(decode_image(data, max_pixels, draft_size=preprocessing.size), preprocessing)


def prepare_images(images: list[bytes | None], preprocessing: ImagePreprocessing, max_pixels: int,
                   request_pixels: int, names: list[str]) -> list[torch.Tensor | None]:
    """A request's images → uint8 (3, S, S) each (None stays None): every header is read and the
    request's pixel budget checked before the first pixel is decoded; errors name the image."""
    size = preprocessing.size
    opened: list[Image.Image | None] = []
    total = 0
    for data, name in zip(images, names, strict=True):
        try:
            if data is None:
                opened.append(None)
                continue
            image, pixels = open_image(data, max_pixels, draft_size=size)
        except ServiceError as error:
            raise named_error(error, name) from None
        opened.append(image)
        total += pixels
    check_request_pixels(total, request_pixels)
    tensors: list[torch.Tensor | None] = []
    for header, name in zip(opened, names, strict=True):
        try:
            tensors.append(None if header is None else image_to_tensor(load_image(header, max_pixels), preprocessing))
        except ServiceError as error:
            raise named_error(error, name) from None
    return tensors
