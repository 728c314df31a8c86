"""The recipe that scales with the data: batch size, steps, calibration plan and class weights.

A recipe in ``IMAGE_RECIPES`` / ``TEXT_RECIPES`` is tuned for tens of thousands of examples. A
user's own folder may hold a few dozen per class, where a batch of 512 with the ragged tail dropped
leaves zero steps and a 10% validation split leaves a handful of examples to fit a temperature on.
Every task (image, text, pairs) asks this module instead of using the recipe's numbers as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

# Fewer examples than this in a class is too few to learn from (and to hold any out for calibration).
MIN_EXAMPLES_PER_CLASS = 5
# When a validation split would hold fewer examples than this, calibrate on out-of-fold predictions
# of every example (K folds) instead: a split of a small set leaves too few to fit a temperature on.
MIN_CALIBRATION_EXAMPLES = 500
DEFAULT_FOLDS = 5
# Batches per epoch the adapted batch size keeps at least, and optimizer steps a run takes at least.
MIN_STEPS_PER_EPOCH = 8
MIN_TOTAL_STEPS = 200
# Below this many examples per class (median), fine-tuning keeps the pretrained backbone frozen and
# fits only the classifier: a full fine-tune of a few dozen images forgets more than it learns.
FREEZE_BACKBONE_BELOW_PER_CLASS = 500
# Class weighting turns on by itself when the largest class outnumbers the smallest by more than this.
IMBALANCE_RATIO = 1.5


class NotEnoughDataError(ValueError):
    """The data set is too small to learn from: says which class and how many examples it needs."""


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """What the adapted recipe does with one data set; recorded in the manifest's metrics."""

    examples: int
    examples_per_class: dict[str, int]
    calibration_folds: int  # 0: one stratified validation split
    freeze: str  # "backbone" or "none" (fine-tuning only)
    class_weights: list[float] | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def class_counts(labels: torch.Tensor, classes: list[str]) -> dict[str, int]:
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    return dict(zip(classes, counts, strict=True))


def check_enough_examples(labels: torch.Tensor, classes: list[str], folds: int = 0) -> dict[str, int]:
    """Per-class counts; a clear error when a class has too few to train on and hold some out."""
    if len(classes) < 2:
        raise NotEnoughDataError(f"a classifier needs at least 2 classes, got {len(classes)} ({', '.join(classes)})")
    counts = class_counts(labels, classes)
    needed = max(MIN_EXAMPLES_PER_CLASS, folds)
    short = {name: count for name, count in counts.items() if count < needed}
    if short:
        listed = ", ".join(f"{name!r} has {count}" for name, count in sorted(short.items()))
        raise NotEnoughDataError(f"too little data to learn from: {listed}; every class needs at least {needed} "
                                 "examples (a few dozen or more give a useful model)")
    return counts


def resolve_folds(requested: int | str | None, examples: int, validation_fraction: float) -> int:
    """``auto`` (or None): K-fold cross-fitting when the validation split would be too small to
    calibrate on, one validation split otherwise."""
    if requested in (None, "auto"):
        return DEFAULT_FOLDS if examples * validation_fraction < MIN_CALIBRATION_EXAMPLES else 0
    folds = int(requested)
    if folds == 1 or folds < 0:
        raise ValueError(f"--calibration-folds must be 0 (one validation split), 2 or more, or auto; got {folds}")
    return folds


def class_weights(labels: torch.Tensor, classes: int, rule: str) -> list[float] | None:
    """Loss weights by class: ``balanced`` (inverse frequency, n / (k · count) as scikit-learn's),
    ``sqrt`` (inverse square-root frequency) or ``none``; the mean weight over examples is 1."""
    counts = torch.bincount(labels, minlength=classes).float().clamp(min=1)
    if rule == "none":
        return None
    if rule not in ("sqrt", "balanced"):
        raise ValueError(f"unknown class weighting {rule!r} (none, sqrt or balanced)")
    weights = (counts.sum() / counts) ** (0.5 if rule == "sqrt" else 1.0)
    return (weights / (weights * counts).sum() * counts.sum()).tolist()


def resolve_class_weights(mode: str | None, labels: torch.Tensor, num_classes: int) -> list[float] | None:
    """``balanced`` or ``none`` as ``class_weights``; ``auto``: balanced only when imbalanced."""
    mode = mode or "auto"
    if mode not in ("auto", "none", "balanced"):
        raise ValueError(f"--class-weights must be auto, none or balanced; got {mode!r}")
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    if mode == "auto":
        mode = "balanced" if float(counts.max() / counts.min()) > IMBALANCE_RATIO else "none"
    return class_weights(labels, num_classes, mode)


def resolve_freeze(mode: str | None, counts: dict[str, int]) -> str:
    """``auto``: the backbone stays frozen when the median class has fewer than a few hundred examples."""
    mode = mode or "auto"
    if mode not in ("auto", "none", "backbone"):
        raise ValueError(f"--freeze must be auto, none or backbone; got {mode!r}")
    if mode != "auto":
        return mode
    median = sorted(counts.values())[len(counts) // 2]
    return "backbone" if median < FREEZE_BACKBONE_BELOW_PER_CLASS else "none"


def adapt_batch_size(recipe_batch_size: int, train_examples: int) -> int:
    """The recipe's batch size, halved until an epoch has ``MIN_STEPS_PER_EPOCH`` batches (at least 8)."""
    batch_size = recipe_batch_size
    while batch_size > 8 and train_examples // batch_size < MIN_STEPS_PER_EPOCH:
        batch_size //= 2
    return max(1, min(batch_size, train_examples))


def adapt_epochs(recipe_epochs: int, steps_per_epoch: int, min_total_steps: int = MIN_TOTAL_STEPS) -> int:
    """Enough epochs for ``min_total_steps`` optimizer steps (a tiny data set needs many passes)."""
    if steps_per_epoch < 1:
        raise NotEnoughDataError("no training step fits in an epoch: fewer examples than one batch")
    return max(recipe_epochs, math.ceil(min_total_steps / steps_per_epoch))


def out_of_fold_logits(labels: torch.Tensor, num_classes: int, folds: int, seed: int,
                       score_fold: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(N, classes) logits of every example from a fit that did not see it: ``score_fold(fold, train,
    held)`` fits on the ``train`` indices and returns the logits of the ``held`` ones."""
    fold_of = stratified_folds(labels, folds, seed)
    logits = torch.empty(len(labels), num_classes)
    for fold in range(folds):
        held = torch.nonzero(fold_of == fold).flatten()
        logits[held] = score_fold(fold, torch.nonzero(fold_of != fold).flatten(), held)
    return logits


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """The fold (0 … folds−1) of every example: each class dealt round-robin after a seeded shuffle."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold_of[members] = torch.arange(len(members)) % folds
    return fold_of
