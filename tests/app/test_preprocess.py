"""Image decoding: formats from bytes, every mode to RGB, bombs refused (in-process, no server)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from servicekit import encode

from app.errors import InvalidImage, PayloadTooLarge, UnsupportedFormat
from app.preprocess import RESAMPLING, decode_image, image_to_tensor, prepare_image, sniff_format
from models.preprocessing import RESIZE_FILTERS, ImagePreprocessing

PREPROCESSING = ImagePreprocessing(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_format_is_recognised_from_the_bytes(fmt: str) -> None:
    assert sniff_format(encode(Image.new("RGB", (8, 8)), fmt)) == fmt


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # 128 × 257
    rgb = decode_image(encode(image, "PNG"), max_pixels=100)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (128, 128, 128)


def test_transparency_is_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(encode(image, "PNG"), max_pixels=100).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA", "RGBA"])
def test_every_mode_becomes_rgb_at_model_size(mode: str) -> None:
    image = Image.new("RGB", (50, 20), (10, 120, 230)).convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    tensor = prepare_image(encode(image, fmt), PREPROCESSING, max_pixels=10_000)
    assert tensor.shape == (3, 32, 32) and str(tensor.dtype) == "torch.uint8"


def test_every_resize_filter_a_checkpoint_may_name_has_its_pillow_filter() -> None:
    assert sorted(RESAMPLING) == sorted(RESIZE_FILTERS)
    stripes = Image.fromarray(np.tile(np.array([0, 255], dtype=np.uint8), (5, 5)).repeat(3).reshape(5, 10, 3))
    resized = {name: image_to_tensor(stripes, ImagePreprocessing(4, (0.5,) * 3, (0.25,) * 3, resize=name))
               for name in RESIZE_FILTERS}
    assert not torch.equal(resized["nearest"], resized["bilinear"])  # the manifest's filter is the one used


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    red, _, blue = decode_image(data, max_pixels=100).getpixel((4, 4))  # type: ignore[misc]
    assert red > 200 and blue < 50


def test_large_photos_are_decoded_at_reduced_size_then_resized() -> None:
    data = encode(Image.new("RGB", (2000, 1500), (90, 90, 90)), "JPEG")
    assert prepare_image(data, PREPROCESSING, max_pixels=4_000_000).shape == (3, 32, 32)


def test_bomb_is_refused_from_its_header() -> None:
    with pytest.raises(PayloadTooLarge, match=r"too large \(3000×3000 pixels\): at most 1,000,000"):
        decode_image(encode(Image.new("1", (3000, 3000)), "PNG"), max_pixels=1_000_000)


@pytest.mark.parametrize(("data", "error"), [
    (b"", InvalidImage), (b"%PDF-1.4 ...", UnsupportedFormat), (b"\x89PNG\r\n\x1a\n" + bytes(40), InvalidImage),
    (b"GIF89a" + bytes(3), InvalidImage),
])
def test_bad_bytes_raise_typed_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_image(data, max_pixels=1000)
