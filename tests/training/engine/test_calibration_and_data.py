"""Calibration, metrics and tensor augmentation."""

from __future__ import annotations

import pytest
import torch

from models.preprocessing import ImagePreprocessing
from training.engine.calibration import calibrate, expected_calibration_error, fit_score_power
from training.engine.loop import seeded_generator
from training.engine.metrics import classification_metrics
from training.image.data import ImageDataset, augment, stratified_split
from training.image.task import ImageBatches


def test_ece_of_perfectly_calibrated_bins_is_zero() -> None:
    probabilities = torch.tensor([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])  # 75% right at 75% confidence
    assert expected_calibration_error(probabilities, labels) < 1e-6


def test_temperature_scaling_repairs_overconfident_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(4000, 5, generator=generator) * 2
    labels = torch.multinomial(clean.softmax(dim=1), 1, generator=generator).flatten()  # calibrated at T=1
    result = calibrate(clean * 4, labels)  # the same ranking, four times too confident
    assert 3.0 < result["temperature"] < 5.0
    assert result["ece_before"] > 0.1
    assert result["ece_after"] < 0.02
    assert result["nll_after"] < result["nll_before"]


def test_metrics_count_a_known_confusion() -> None:
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 1, 1])
    metrics = classification_metrics(logits, labels, ["a", "b"])
    assert metrics["confusion_matrix"] == [[1, 0], [1, 2]]
    assert metrics["accuracy"] == 0.75
    assert metrics["per_class_accuracy"] == pytest.approx({"a": 1.0, "b": 2 / 3})


def test_stratified_split_holds_out_the_same_fraction_of_every_class() -> None:
    labels = torch.arange(10).repeat_interleave(50)
    train, validation = stratified_split(labels, 0.1, seed=3)
    assert len(set(train.tolist()) & set(validation.tolist())) == 0
    assert torch.bincount(labels[validation]).tolist() == [5] * 10
    assert torch.equal(stratified_split(labels, 0.1, seed=3)[1], validation)


def test_augment_translates_and_flips_without_changing_content() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    out = augment(images, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    # the centre 4×4 of every output is a shifted, possibly mirrored, window of its input
    for original, moved in zip(images, out, strict=True):
        padded = torch.nn.functional.pad(original[None].float(), (2,) * 4, mode="reflect")[0]
        windows = {tuple(padded[:, dy + 2:dy + 6, dx + 2:dx + 6].flatten().tolist()) for dy in range(5) for dx in range(5)}
        flipped = torch.nn.functional.pad(original.flip(-1)[None].float(), (2,) * 4, mode="reflect")[0]
        windows |= {tuple(flipped[:, dy + 2:dy + 6, dx + 2:dx + 6].flatten().tolist()) for dy in range(5) for dx in range(5)}
        assert tuple(moved[:, 2:6, 2:6].float().flatten().tolist()) in windows


def test_alternating_flip_mirrors_each_image_in_every_other_epoch() -> None:
    # Each image is a horizontal ramp whose direction shows whether it was mirrored.
    ramp = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8).expand(64, 3, 8, 8).contiguous()
    data = ImageDataset(ramp, torch.arange(64) % 4, ["a", "b", "c", "d"], "test")
    batches = ImageBatches(data, batch_size=64, seed=0, preprocessing=ImagePreprocessing(8, (0.0,) * 3, (1.0,) * 3),
                           flip="alternating")

    def mirrored(epoch: int) -> dict[int, bool]:
        order = torch.randperm(64, generator=seeded_generator(0, epoch)).tolist()
        (images,), _ = batches.batch(epoch, 0, rank=0, world_size=1)
        return {index: bool(image[0, 0, 0] > image[0, 0, -1]) for index, image in zip(order, images, strict=True)}

    first, second, third = mirrored(0), mirrored(1), mirrored(2)
    assert 16 < sum(first.values()) < 48  # a random half to start with
    assert all(second[i] != first[i] for i in range(64)) and third == first
    with pytest.raises(ValueError, match="unknown flip mode"):
        ImageBatches(data, 8, 0, [0.0] * 3, [1.0] * 3, flip="sometimes")


def test_score_power_is_recovered_from_labels_drawn_with_it() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6000, 5, generator=generator) * 1.5  # like SVM scores: a few units either side of 0
    true_logits = scores.sign() * scores.abs() ** 2.0 / 0.5
    labels = torch.multinomial(true_logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    assert fit_score_power(scores, labels) in (1.9, 2.0, 2.1)
    assert fit_score_power(true_logits * 0.5, labels) in (1.0, 1.1)  # already the right shape: left alone
