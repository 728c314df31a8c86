"""The image preprocessing contract: read from manifests strictly, written back unchanged, one normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, new_manifest, read_manifest
from models.fusion import fusion_preprocessing
from models.preprocessing import ImagePreprocessing, ImagePreprocessingError

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
VALID = {"kind": "image", "size": 32, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "color": "RGB",
         "resize": "bilinear"}


def _bundled_image_entries() -> list[tuple[str, dict[str, object]]]:
    entries = []
    for directory in sorted(CHECKPOINTS.iterdir()):
        preprocessing = json.loads((directory / "manifest.json").read_text())["preprocessing"]
        if preprocessing.get("kind") == "image":
            entries.append((directory.name, preprocessing))
        elif preprocessing.get("kind") == "multimodal":
            entries.append((directory.name, preprocessing["image"]))
    return entries


@pytest.mark.parametrize(("name", "entry"), _bundled_image_entries(), ids=[n for n, _ in _bundled_image_entries()])
def test_bundled_manifests_round_trip_to_the_same_dict_in_the_same_order(name: str, entry: dict[str, object]) -> None:
    values = ImagePreprocessing.from_dict(entry).to_dict()
    assert values == entry and list(values) == ["kind", "size", "mean", "std", "color", "resize"]
    assert json.dumps(values, indent=2, sort_keys=True) == json.dumps(entry, indent=2, sort_keys=True)


def test_every_bundled_image_checkpoint_is_covered() -> None:
    assert {name for name, _ in _bundled_image_entries()} >= {"cifar10-fastconv", "cifar10-trunk", "mvsa-fusion"}


def test_a_manifest_is_read_for_its_own_task() -> None:
    image = read_manifest(CHECKPOINTS / "cifar10-fastconv")
    assert ImagePreprocessing.from_manifest(image).size == 32
    fusion = read_manifest(CHECKPOINTS / "mvsa-fusion")
    assert fusion_preprocessing(fusion)[0] == ImagePreprocessing.from_dict(fusion.preprocessing["image"])
    with pytest.raises(ImagePreprocessingError, match="is a multimodal checkpoint, not an image one"):
        ImagePreprocessing.from_manifest(fusion)


def test_colour_and_resize_default_to_what_every_checkpoint_uses() -> None:
    preprocessing = ImagePreprocessing.from_dict({"kind": "image", "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3})
    assert (preprocessing.color, preprocessing.resize) == ("RGB", "bilinear")


@pytest.mark.parametrize(("change", "message"), [
    ({"kind": "text"}, "kind 'text' is not 'image'"),
    ({"kind": None}, "kind None is not 'image'"),
    ({"size": 0}, "size must be a positive integer, got 0"),
    ({"size": 32.5}, "size must be a positive integer"),
    ({"size": True}, "size must be a positive integer"),
    ({"size": None}, "size must be a positive integer"),
    ({"mean": [0.5, 0.5]}, "mean must be 3 numbers"),
    ({"mean": "0.5"}, "mean must be 3 numbers"),
    ({"mean": [0.5, "0.5", 0.5]}, "mean must hold finite numbers"),
    ({"mean": [0.5, float("nan"), 0.5]}, "mean must hold finite numbers"),
    ({"std": [0.25, 0.0, 0.25]}, "std must be positive"),
    ({"std": [0.25, -0.1, 0.25]}, "std must be positive"),
    ({"color": "BGR"}, "color 'BGR' is not one of \\['RGB'\\]"),
    ({"resize": "area"}, "resize 'area' is not one of"),
    ({"interpolation": "bilinear"}, "unknown image preprocessing fields \\['interpolation'\\]"),
])
def test_bad_entries_are_refused_with_a_message_naming_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(ImagePreprocessingError, match=message):
        ImagePreprocessing.from_dict({**VALID, **change})


@pytest.mark.parametrize("field", ["size", "mean", "std"])
def test_a_missing_required_field_is_named(field: str) -> None:
    with pytest.raises(ImagePreprocessingError, match=f"lacks \\['{field}'\\]"):
        ImagePreprocessing.from_dict({k: v for k, v in VALID.items() if k != field})


def test_errors_are_checkpoint_errors_and_value_errors_naming_the_checkpoint() -> None:
    manifest = new_manifest("broken", "image", "lenet", {}, classes=["a"], preprocessing={**VALID, "size": -1})
    with pytest.raises(CheckpointError, match="checkpoint 'broken': image preprocessing: size"):
        ImagePreprocessing.from_manifest(manifest)
    with pytest.raises(ValueError, match="must be a JSON object"):
        ImagePreprocessing.from_dict([32])


def test_normalize_is_the_old_formula_bit_for_bit() -> None:
    preprocessing = ImagePreprocessing.from_dict(_bundled_image_entries()[0][1])
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # what serving and training wrote out, each in its own place, before the contract was one object
    mean = torch.tensor(list(preprocessing.mean)).view(1, -1, 1, 1) * 255
    std = torch.tensor(list(preprocessing.std)).view(1, -1, 1, 1) * 255
    expected = (images.float() - mean) / std
    assert torch.equal(preprocessing.normalize(images), expected)
    assert torch.equal(preprocessing.normalize(images, preprocessing.scales("cpu")), expected)
    assert preprocessing.normalize(images).dtype == torch.float32


def test_fitting_to_images_gives_their_channel_mean_and_std_on_the_unit_scale() -> None:
    images = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 255.0)]).to(torch.uint8)
    images[:, 2] = 51  # a constant blue channel has no spread
    images[1, 2, 0, 0] = 255
    fitted = ImagePreprocessing.from_images(images, size=4)
    assert fitted.size == 4 and fitted.mean[:2] == pytest.approx((0.5, 0.5))
    floats = images.float() / 255
    assert fitted.std == pytest.approx(tuple(floats.std(dim=(0, 2, 3)).tolist()))
    standardised = fitted.normalize(images)
    assert standardised.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert standardised.std(dim=(0, 2, 3)) == pytest.approx(torch.ones(3), abs=1e-5)


def test_constant_images_cannot_be_standardised() -> None:
    with pytest.raises(ImagePreprocessingError, match="std must be positive"):
        ImagePreprocessing.from_images(torch.full((2, 3, 4, 4), 7, dtype=torch.uint8), size=4)
