"""The image task's options, recipes and batches, and ``run_image_training``, the entry point of
``pretrain-image`` and ``finetune-image``.

The stages themselves (``training.engine.trainer``) live in ``training.image.pretrain`` (from
scratch, or a full refit) and ``training.image.finetune`` (from a checkpoint, adapted to the data).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.preprocessing import ImagePreprocessing
from training.engine.loop import Batch, LoopConfig, seeded_generator
from training.engine.options import RunOptions
from training.engine.recipe import Recipe, merge_recipes
from training.engine.trainer import run_trainer
from training.image.data import ImageDataset, augment

# Recipes that are known to work for each architecture on CIFAR-sized images (2-core CPU budget);
# ``extra["flip"]``: how training images are mirrored (``ImageBatches``).
# fastconv trains its filters with Muon (training.engine.muon: the rates of airbench94_muon, per
# example, at batch 1000, which this CPU runs ~10% faster per image than 2000), from identity convs.
IMAGE_RECIPES: dict[str, Recipe] = {
    "fastconv": Recipe(loop={"epochs": 13, "optimizer": "muon", "lr": 0.24, "label_smoothing": 0.2,
                             "warmup_fraction": 0.0},
                       batch_size=1000, model={"tta_translate": True, "identity_init": True},
                       extra={"flip": "alternating"}),
    "lenet": Recipe(loop={"epochs": 10, "optimizer": "sgd", "lr": 1e-3, "weight_decay": 0.0, "label_smoothing": 0.0,
                          "warmup_fraction": 0.0, "momentum": 0.9, "schedule": "constant"},
                    batch_size=100),
    "trunk": Recipe(loop={"epochs": 20, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05,
                          "label_smoothing": 0.1, "warmup_fraction": 0.1, "schedule": "cosine"},
                    batch_size=256, model={"tta_flip": True}, extra={"flip": "alternating"}),
}

# Fine-tuning a trained fastconv keeps Nesterov SGD (at a quarter of this rate): its rate scales
# linearly with the small batches of a user's folder, and it leaves the trained BatchNorm scales free.
TRANSFER_RECIPES: dict[str, Recipe] = {
    "fastconv": Recipe(loop={"epochs": 13, "optimizer": "sgd", "lr": 0.4, "weight_decay": 5e-4,
                             "label_smoothing": 0.2, "warmup_fraction": 0.25},
                       batch_size=512, model={"tta_translate": True}, extra={"flip": "alternating"}),
}

FLIP_MODES = ("random", "alternating")
IMAGE_SIZE = 32  # what a run decodes its images to, and the size its checkpoint records


class ImageBatches:
    """Shuffled, augmented, normalised batches of an in-memory uint8 image set.

    ``flip="alternating"`` mirrors each image in every other epoch (a random half in the first
    epoch, then exactly the other half, and so on) instead of tossing a coin each time: every
    image is seen both ways within any two epochs, which matters when there are only a dozen.
    """

    def __init__(self, data: ImageDataset, batch_size: int, seed: int, preprocessing: ImagePreprocessing,
                 augment_images: bool = True, channels_last: bool = True, flip: str = "random") -> None:
        if flip not in FLIP_MODES:
            raise ValueError(f"unknown flip mode {flip!r} (one of {', '.join(FLIP_MODES)})")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.preprocessing = preprocessing
        self.augment_images, self.channels_last = augment_images, channels_last
        self.first_epoch_flips = None
        if flip == "alternating":
            self.first_epoch_flips = torch.rand(len(data), generator=seeded_generator(seed, 0xF1)) < 0.5

    def steps_per_epoch(self) -> int:
        return len(self.data) // self.batch_size  # drop the ragged tail: steady BatchNorm statistics

    def batch(self, epoch: int, step: int, rank: int, world_size: int) -> Batch:
        order = torch.randperm(len(self.data), generator=seeded_generator(self.seed, epoch))
        indices = order[step * self.batch_size:(step + 1) * self.batch_size][rank::world_size]
        images = self.data.images[indices]
        if self.augment_images:
            flips = None
            if self.first_epoch_flips is not None:
                flips = self.first_epoch_flips[indices] ^ bool(epoch % 2)
            images = augment(images, seeded_generator(self.seed, epoch, step, rank), flips=flips)
        images = self.preprocessing.normalize(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images,), self.data.labels[indices]


def evaluation_batches(data: ImageDataset, preprocessing: ImagePreprocessing, batch_size: int = 1000):  # type: ignore[no-untyped-def]
    for start in range(0, len(data), batch_size):
        images = preprocessing.normalize(data.images[start:start + batch_size]).contiguous(memory_format=torch.channels_last)
        yield (images,), data.labels[start:start + batch_size]


EPOCH_VALIDATION_IMAGES = 2000


@contextlib.contextmanager
def without_translate_tta(model: nn.Module) -> Iterator[None]:
    """Evaluate ``model`` without its translate test-time augmentation (if it has one) for a while."""
    config: Any = getattr(model, "config", None)
    if not getattr(config, "tta_translate", False):
        yield
        return
    setattr(model, "config", dataclasses.replace(config, tta_translate=False))  # noqa: B010
    try:
        yield
    finally:
        setattr(model, "config", config)  # noqa: B010


@dataclasses.dataclass(kw_only=True)
class ImageRunOptions(RunOptions):
    output: Path
    architecture: str = "fastconv"
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    parent: Path | None = None  # fine-tune from this checkpoint
    # With ``refit_full``: the same recipe and seed, trained with the split and validated on it, whose
    # calibration and validation metrics the refit keeps (training.engine.refit).
    calibration_from: Path | None = None
    # The validation split's seed when it must differ from ``seed``: ensemble members share one split
    # (so the ensemble is calibrated on images none of them saw) but not their initialisation.
    split_seed: int | None = None
    # Fine-tuning (see training.engine.adaptive): auto picks by the size of the data.
    freeze: str = "auto"  # auto | backbone | none
    class_weights: str = "auto"  # auto | balanced | none


def image_recipe(options: ImageRunOptions, architecture: str, transfer: bool = False) -> Recipe:
    """The architecture's recipe (its transfer recipe when fine-tuning) ← the command line's loop,
    batch size and config overrides.

    An architecture without a recipe borrows fastconv's loop and batch size, not its model config.
    """
    recipes = {**IMAGE_RECIPES, **TRANSFER_RECIPES} if transfer else IMAGE_RECIPES
    recipe = recipes.get(architecture) or dataclasses.replace(recipes["fastconv"], model={})
    return merge_recipes(recipe, Recipe(loop=options.loop, batch_size=options.batch_size, model=options.model_config))


def _recipe(options: ImageRunOptions, architecture: str, transfer: bool) -> tuple[LoopConfig, int, str]:
    """The architecture's recipe with the command line's overrides: (loop, batch size, flip mode)."""
    recipe = image_recipe(options, architecture, transfer)
    loop = recipe.loop_config(options.seed)
    if transfer and "lr" not in options.loop:
        loop = dataclasses.replace(loop, lr=loop.lr / 4)  # gentler for transfer; --lr overrides
    assert recipe.batch_size is not None  # every image recipe has one
    return loop, recipe.batch_size, str(recipe.extra.get("flip", "random"))


def recipe_for_finetune(options: ImageRunOptions, architecture: str) -> tuple[LoopConfig, int, str]:
    """The architecture's recipe for fine-tuning (a gentler rate): (loop, batch size, flip mode)."""
    return _recipe(options, architecture, transfer=True)


def run_image_training(options: ImageRunOptions) -> dict[str, Any]:
    """``pretrain-image`` (from scratch, or a full refit) and ``finetune-image`` (``options.parent``)."""
    from training.image.finetune import ImageFinetuneTrainer
    from training.image.pretrain import ImagePretrainTrainer

    if options.parent is not None and not options.refit_full:
        return run_trainer(ImageFinetuneTrainer(), options)
    return run_trainer(ImagePretrainTrainer(), options)
