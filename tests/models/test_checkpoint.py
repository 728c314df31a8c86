"""The checkpoint format: round trip, atomic writes, strict loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import build_model
from models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict,
    new_manifest,
    read_extra_file,
    read_manifest,
    save_checkpoint,
)
from models.registry import UnknownModelError, available_models


def _save_lenet(directory: Path, **extra: bytes) -> Path:
    model = build_model("lenet", {"num_classes": 3})
    manifest = new_manifest("tiny", "image", "lenet", model.config, classes=["a", "b", "c"],
                            preprocessing={"kind": "image", "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3})
    return save_checkpoint(directory, model, manifest, extra_files=extra or None)


def test_round_trip_restores_identical_outputs(tmp_path: Path) -> None:
    model = build_model("fastconv", {"num_classes": 4, "widths": [8, 16, 16]})
    manifest = new_manifest("conv", "image", "fastconv", model.config, classes=list("abcd"),
                            preprocessing={"kind": "image", "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
                            calibration={"temperature": 1.7})
    save_checkpoint(tmp_path / "conv", model, manifest)
    loaded = load_checkpoint(tmp_path / "conv")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model(images), model.eval()(images))
    assert loaded.manifest.temperature == pytest.approx(1.7)
    assert loaded.manifest.config["widths"] == [8, 16, 16]
    assert len(loaded.manifest.weights_sha256) == 64


def test_extra_files_are_hashed_and_verified(tmp_path: Path) -> None:
    directory = _save_lenet(tmp_path / "ck", **{"vocab.json": b'["<pad>"]'})
    manifest = read_manifest(directory)
    assert read_extra_file(directory, manifest, "vocab.json") == b'["<pad>"]'
    (directory / "vocab.json").write_bytes(b'["tampered"]')
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(directory)


def test_load_rejects_edited_weights(tmp_path: Path) -> None:
    directory = _save_lenet(tmp_path / "ck")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(directory)


def test_load_rejects_unknown_format_version(tmp_path: Path) -> None:
    directory = _save_lenet(tmp_path / "ck")
    values = json.loads((directory / "manifest.json").read_text())
    values["format_version"] = 99
    (directory / "manifest.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(directory)


def test_load_rejects_weights_for_another_architecture(tmp_path: Path) -> None:
    directory = _save_lenet(tmp_path / "ck")
    values = json.loads((directory / "manifest.json").read_text())
    values["config"]["num_classes"] = 5  # head shape no longer matches the stored tensors
    (directory / "manifest.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(directory)


def test_load_rejects_missing_keys(tmp_path: Path) -> None:
    directory = _save_lenet(tmp_path / "ck")
    values = json.loads((directory / "manifest.json").read_text())
    values["architecture"] = "fastconv"
    values["config"] = {"num_classes": 3}
    (directory / "manifest.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(directory)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        load_checkpoint(tmp_path / "nothing")


def test_save_replaces_existing_checkpoint_atomically(tmp_path: Path) -> None:
    first = _save_lenet(tmp_path / "ck")
    old_hash = read_manifest(first).weights_sha256
    torch.manual_seed(1)
    _save_lenet(tmp_path / "ck")
    assert read_manifest(first).weights_sha256 != old_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging or retired dirs left


def test_bad_extra_file_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad extra file name"):
        _save_lenet(tmp_path / "ck", **{"../escape": b""})


def test_crash_during_save_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _save_lenet(tmp_path / "ck")
    before = read_manifest(directory).weights_sha256

    def write_half_then_crash(tensors: dict[str, torch.Tensor], path: str) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("models.checkpoint.save_file", write_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        _save_lenet(tmp_path / "ck")
    assert read_manifest(directory).weights_sha256 == before
    state, _ = load_state_dict(directory)
    assert "classifier.5.weight" in state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_weights_file_is_not_pickle(tmp_path: Path) -> None:
    directory = _save_lenet(tmp_path / "ck")
    header = (directory / "model.safetensors").read_bytes()[:16]
    assert not header.startswith(b"\x80")  # pickle protocol marker
    assert b"PK" not in header[:4]  # torch.save zip archive


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown architecture 'resnet9000'.*fastconv"):
        build_model("resnet9000")


def test_unknown_config_field_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown config fields"):
        build_model("lenet", {"depth": 3})


@pytest.mark.parametrize("name", ["lenet", "fastconv", "trunk"])
def test_every_image_architecture_maps_images_to_logits(name: str) -> None:
    assert name in available_models()
    model = build_model(name, {"num_classes": 7}).eval()
    with torch.inference_mode():
        logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


def test_fastconv_translate_tta_averages_centred_and_shifted_mirrored_views() -> None:
    torch.manual_seed(0)
    model = build_model("fastconv", {"num_classes": 4, "widths": [8, 16, 16], "tta_translate": True}).eval()
    images = torch.randn(2, 3, 32, 32)

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model.logits(x) + model.logits(x.flip(-1)))

    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    expected = 0.5 * mirrored(images) + 0.25 * (mirrored(padded[..., :32, :32]) + mirrored(padded[..., 2:, 2:]))
    with torch.inference_mode():
        assert torch.allclose(model(images), expected, atol=1e-5)
        model.train()
        assert torch.allclose(model(images), model.logits(images))  # no augmentation while training


def _edit_manifest(directory: Path, **changes: object) -> None:
    path = directory / "manifest.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("name", ["../outside.json", "/etc/passwd", "sub/../../outside.json"])
def test_manifest_file_names_outside_the_checkpoint_are_refused(tmp_path: Path, name: str) -> None:
    directory = _save_lenet(tmp_path / "ckpt", **{"vocab.json": b"[]"})
    (tmp_path / "outside.json").write_bytes(b"[]")
    files = json.loads((directory / "manifest.json").read_text())["files"]
    _edit_manifest(directory, files={**files, name: files["vocab.json"]})
    with pytest.raises(CheckpointError, match="leads outside the checkpoint directory"):
        load_checkpoint(directory)
    with pytest.raises(CheckpointError, match="leads outside the checkpoint directory"):
        read_extra_file(directory, read_manifest(directory), name)


def test_a_symlink_out_of_the_checkpoint_is_refused(tmp_path: Path) -> None:
    directory = _save_lenet(tmp_path / "ckpt", **{"vocab.json": b"[]"})
    (tmp_path / "secret.json").write_bytes(b"[]")
    (directory / "vocab.json").unlink()
    (directory / "vocab.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(CheckpointError, match="link that leads outside the checkpoint directory"):
        load_checkpoint(directory)


def test_weights_linked_from_outside_are_refused(tmp_path: Path) -> None:
    directory = _save_lenet(tmp_path / "ckpt")
    (directory / "model.safetensors").rename(tmp_path / "weights")
    (directory / "model.safetensors").symlink_to(tmp_path / "weights")
    with pytest.raises(CheckpointError, match="link that leads outside"):
        load_checkpoint(directory)


def test_a_symlink_inside_the_checkpoint_is_allowed(tmp_path: Path) -> None:
    directory = _save_lenet(tmp_path / "ckpt", **{"vocab.json": b"[]"})
    (directory / "vocab.json").rename(directory / "real.json")
    (directory / "vocab.json").symlink_to("real.json")
    assert read_extra_file(directory, read_manifest(directory), "vocab.json") == b"[]"
