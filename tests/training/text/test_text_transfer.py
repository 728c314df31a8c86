"""Image → text transfer: the trunk really comes from the image checkpoint, and bad sources are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, load_state_dict
from models.trunk import TrunkTransferError, trunk_state
from training.cli import main
from training.text.task import apply_freeze, text_trunk_from_image


def test_text_model_trunk_tensors_equal_the_image_checkpoint(image_trunk_checkpoint: Path) -> None:
    image_state, _ = load_state_dict(image_trunk_checkpoint)
    model = text_trunk_from_image(image_trunk_checkpoint, vocab_size=40, num_classes=3, max_tokens=16)
    text_trunk, image_trunk = trunk_state(model.state_dict()), trunk_state(image_state)
    assert set(text_trunk) == set(image_trunk) and len(text_trunk) > 10
    for name, tensor in image_trunk.items():
        assert torch.equal(text_trunk[name], tensor), name
    assert set(model.adapters) == {"text"} and model.head.out_features == 3


def test_transfer_refuses_a_checkpoint_without_a_trunk(fastconv_checkpoint: Path) -> None:
    with pytest.raises(TrunkTransferError, match="'fastconv' checkpoint with no shared trunk"):
        text_trunk_from_image(fastconv_checkpoint, vocab_size=40, num_classes=3, max_tokens=16)


def test_transfer_refuses_a_trunk_of_another_width(image_trunk_checkpoint: Path) -> None:
    with pytest.raises(TrunkTransferError, match=r"has shape .* this model needs"):
        text_trunk_from_image(image_trunk_checkpoint, 40, 3, 16, overrides={"dim": 64, "heads": 2})


def test_freeze_trunk_except_norms_leaves_only_norms_adapter_and_head_trainable(image_trunk_checkpoint: Path) -> None:
    model = text_trunk_from_image(image_trunk_checkpoint, vocab_size=40, num_classes=3, max_tokens=16)
    apply_freeze(model, "trunk-except-norms")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("adapters.", "head.")) or "norm" in n for n in trainable)
    assert "trunk.norm.weight" in trainable and "trunk.encoder.layers.0.norm1.weight" in trainable
    assert "trunk.encoder.layers.0.linear1.weight" not in trainable
    with pytest.raises(ValueError, match="--freeze must be one of"):
        apply_freeze(model, "half")


def test_finetune_text_command_keeps_frozen_trunk_and_records_lineage(image_trunk_checkpoint: Path, news_subset: Path,
                                                                     tmp_path: Path) -> None:
    output = tmp_path / "text-from-image"
    code = main(["finetune-text", "--from", str(image_trunk_checkpoint), "--data", str(news_subset),
                 "--output", str(output), "--freeze", "trunk", "--epochs", "1", "--max-tokens", "32",
                 "--batch-size", "32", "--device", "cpu"])
    assert code == 0
    loaded = load_checkpoint(output)
    manifest = loaded.manifest
    assert manifest.task == "text" and manifest.architecture == "trunk" and manifest.parent is not None
    image_manifest = json.loads((image_trunk_checkpoint / "manifest.json").read_text())
    assert manifest.parent["weights_sha256"] == image_manifest["weights_sha256"]
    assert "vocab.json" in manifest.files
    image_state, _ = load_state_dict(image_trunk_checkpoint)
    for name, tensor in trunk_state(image_state).items():  # frozen: still the image weights after training
        assert torch.equal(trunk_state(loaded.model.state_dict())[name], tensor), name


def test_finetune_text_from_a_fastconv_checkpoint_exits_with_a_clear_error(
        fastconv_checkpoint: Path, news_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["finetune-text", "--from", str(fastconv_checkpoint), "--data", str(news_subset),
                 "--output", str(tmp_path / "x"), "--epochs", "1"])
    assert code == 2
    assert "no shared trunk" in capsys.readouterr().err
