"""Fine-tuning that adapts to the data: a small folder trains (never zero steps), calibrates on
out-of-fold predictions, records its plan, and refuses data too small to learn from (the text
counterpart is tests/training/text/test_text_small_data.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models import build_model
from models.checkpoint import load_checkpoint, read_manifest
from training.cli import main
from training.engine.adaptive import (
    NotEnoughDataError,
    adapt_batch_size,
    adapt_epochs,
    check_enough_examples,
    resolve_class_weights,
    resolve_folds,
    resolve_freeze,
)
from training.engine.loop import LoopConfig, fit
from training.image.head_fit import cross_fit_head

ROOT = Path(__file__).resolve().parents[3]
BUNDLED_IMAGE = ROOT / "checkpoints" / "cifar10-fastconv"


def test_batch_size_shrinks_until_an_epoch_has_steps() -> None:
    assert adapt_batch_size(512, 45_000) == 512  # the CIFAR recipe is left as it is
    assert adapt_batch_size(512, 270) == 32  # 3 classes × 90 images: 8 steps an epoch, not 0
    assert adapt_batch_size(512, 20) == 8
    assert adapt_batch_size(512, 5) == 5


def test_epochs_grow_until_the_run_takes_enough_steps() -> None:
    assert adapt_epochs(13, 87) == 13
    assert adapt_epochs(13, 8) == 25  # 200 steps at least
    with pytest.raises(NotEnoughDataError):
        adapt_epochs(13, 0)


def test_small_data_is_cross_fitted_and_large_data_split() -> None:
    assert resolve_folds("auto", 300, 0.1) == 5
    assert resolve_folds("auto", 50_000, 0.1) == 0
    assert resolve_folds("3", 300, 0.1) == 3 and resolve_folds(0, 300, 0.1) == 0
    with pytest.raises(ValueError, match=r"0 .* 2 or more"):
        resolve_folds(1, 300, 0.1)


def test_class_weights_turn_on_for_imbalanced_data_only() -> None:
    balanced = torch.tensor([0] * 50 + [1] * 50)
    skewed = torch.tensor([0] * 90 + [1] * 10)
    assert resolve_class_weights("auto", balanced, 2) is None
    assert resolve_class_weights("auto", skewed, 2) == pytest.approx([100 / 180, 100 / 20])
    assert resolve_class_weights("none", skewed, 2) is None
    assert resolve_class_weights("balanced", balanced, 2) == pytest.approx([1.0, 1.0])


def test_freeze_auto_keeps_the_backbone_for_a_few_hundred_per_class() -> None:
    assert resolve_freeze("auto", {"a": 100, "b": 120, "c": 90}) == "backbone"
    assert resolve_freeze("auto", {"a": 5000, "b": 5000}) == "none"
    assert resolve_freeze("none", {"a": 10, "b": 10}) == "none"


def test_too_little_data_names_the_class_and_what_it_needs() -> None:
    labels = torch.tensor([0] * 20 + [1] * 3)
    with pytest.raises(NotEnoughDataError, match=r"'dog' has 3.*at least 5"):
        check_enough_examples(labels, ["cat", "dog"])
    with pytest.raises(NotEnoughDataError, match="at least 2 classes"):
        check_enough_examples(torch.zeros(10, dtype=torch.long), ["cat"])


@pytest.mark.parametrize("views", [{"tta_flip": False}, {"tta_flip": True}, {"tta_flip": True, "tta_translate": True}])
def test_a_head_fitted_on_head_features_gives_the_models_own_logits(views: dict[str, bool]) -> None:
    model = build_model("fastconv", {"num_classes": 3, "widths": [8, 16, 16], **views}).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        features = model.head_features(images)
        assert torch.allclose(features @ model.head.weight.T, model(images), atol=1e-5)


def test_cross_fitted_head_separates_separable_features_and_scores_out_of_fold() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(30)
    features = torch.nn.functional.one_hot(labels, 3).float() * 3 + torch.randn(90, 3, generator=generator)
    head = cross_fit_head(features, labels, 3, folds=5, seed=0)
    assert head.weight.shape == (3, 3) and head.out_of_fold_logits.shape == (90, 3)
    assert float((head.out_of_fold_logits.argmax(dim=1) == labels).float().mean()) > 0.9


def test_frozen_batch_norms_keep_their_statistics_while_the_head_trains() -> None:
    from training.image.finetune import freeze_backbone

    model = build_model("fastconv", {"num_classes": 2, "widths": [8, 16, 16], "tta_flip": False})
    freeze_backbone(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    class Source:
        def steps_per_epoch(self) -> int:
            return 2

        def batch(self, epoch: int, step: int, rank: int, world_size: int):  # type: ignore[no-untyped-def]
            return (torch.randn(8, 3, 32, 32) * 5 + 3,), torch.randint(0, 2, (8,))

    head_before = model.head.weight.clone()
    fit(model, Source(), LoopConfig(epochs=1, lr=0.1, precision="fp32"), device=torch.device("cpu"))
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.head.weight)


def _own_images(cifar_subset: Path, target: Path, per_class: int) -> Path:
    for name in ("cat", "dog", "ship"):
        (target / name).mkdir(parents=True)
        for path in sorted((cifar_subset / name).iterdir())[:per_class]:
            shutil.copy(path, target / name / path.name)
    return target


def test_finetune_on_a_small_folder_fits_a_calibrated_head_and_records_its_plan(cifar_subset: Path, tmp_path: Path) -> None:
    own = _own_images(cifar_subset, tmp_path / "own", 50)
    assert main(["finetune-image", "--from", str(BUNDLED_IMAGE), "--data", str(own), "--output", str(tmp_path / "pets")]) == 0
    tuned = load_checkpoint(tmp_path / "pets")
    validation = tuned.manifest.metrics["validation"]
    assert validation["plan"]["freeze"] == "backbone" and validation["plan"]["calibration_folds"] == 5
    assert validation["plan"]["examples_per_class"] == {"cat": 50, "dog": 50, "ship": 50}
    assert validation["count"] == 150  # every image scored out of fold, not a 15-image split
    assert validation["accuracy"] > 0.8  # chance is 1/3
    assert tuned.manifest.parent is not None and tuned.manifest.parent["name"] == "cifar10-fastconv"
    # only the head changed: the backbone is the parent's, bit for bit
    parent = load_checkpoint(BUNDLED_IMAGE).model.state_dict()
    assert all(torch.equal(value, parent[key]) for key, value in tuned.model.state_dict().items() if not key.startswith("head"))


def test_full_finetune_of_a_small_folder_takes_steps(cifar_subset: Path, tmp_path: Path) -> None:
    """The seed's failure: a batch of 512 with the ragged tail dropped left zero steps on 150 images."""
    own = _own_images(cifar_subset, tmp_path / "own", 20)
    assert main(["finetune-image", "--from", str(BUNDLED_IMAGE), "--data", str(own), "--output", str(tmp_path / "full"),
                 "--freeze", "none", "--calibration-folds", "0", "--validation-fraction", "0.25", "--epochs", "2"]) == 0
    validation = read_manifest(tmp_path / "full").metrics["validation"]
    assert validation["batch_size"] == 8 and validation["plan"]["freeze"] == "none"
    assert len(validation["history"]) == 2 and all(row["train_loss"] > 0 for row in validation["history"])


def test_finetune_refuses_a_class_too_small_to_learn(cifar_subset: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    own = _own_images(cifar_subset, tmp_path / "own", 20)
    for path in sorted((own / "dog").iterdir())[3:]:
        path.unlink()
    assert main(["finetune-image", "--from", str(BUNDLED_IMAGE), "--data", str(own), "--output", str(tmp_path / "x")]) == 2
    assert "'dog' has 3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
