"""Image pretraining and fine-tuning: from an image folder to a calibrated checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from models import build_model
from models.checkpoint import Manifest, new_manifest, read_manifest, save_checkpoint, sha256_file
from models.preprocessing import ImagePreprocessing
from training.engine.adaptive import adapt_batch_size, adapt_epochs, check_enough_examples
from training.engine.common import code_version, command_line, finish_checkpoint, lineage, pick_device
from training.engine.loop import Batch, LoopConfig, discard_training_state, fit, predict_logits, seeded_generator
from training.engine.metrics import plot_training_curves
from training.image.data import ImageDataset, augment, load_image_folder, stratified_split

logger = logging.getLogger(__name__)

# Recipes that are known to work for each architecture on CIFAR-sized images (2-core CPU budget).
IMAGE_RECIPES: dict[str, dict[str, Any]] = {
    "fastconv": {"epochs": 13, "batch_size": 512, "optimizer": "sgd", "lr": 0.4, "weight_decay": 5e-4,
                 "label_smoothing": 0.2, "warmup_fraction": 0.25, "flip": "alternating",
                 "model": {"tta_translate": True}},
    "lenet": {"epochs": 10, "batch_size": 100, "optimizer": "sgd", "lr": 1e-3, "weight_decay": 0.0,
              "label_smoothing": 0.0, "warmup_fraction": 0.0, "momentum": 0.9, "schedule": "constant"},
    "trunk": {"epochs": 20, "batch_size": 256, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05,
              "label_smoothing": 0.1, "warmup_fraction": 0.1, "schedule": "cosine", "flip": "alternating",
              "model": {"tta_flip": True}},
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


@dataclasses.dataclass
class ImageRunOptions:
    data: Path
    output: Path
    architecture: str = "fastconv"
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    loop: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int | None = None
    validation_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    name: str | None = None
    parent: Path | None = None  # fine-tune from this checkpoint
    limit: int | None = None  # use only this many training images (smoke tests)
    stop_after_steps: int | None = None
    command: str = ""  # the command line recorded in the manifest
    # Train on every image (no validation split) and take the calibration and the validation metrics
    # from ``calibration_from``: the same recipe and seed, trained with the split and validated on it.
    refit_full: bool = False
    calibration_from: Path | None = None
    # Fine-tuning (see training.engine.adaptive): auto picks by the size of the data.
    freeze: str = "auto"  # auto | backbone | none
    class_weights: str = "auto"  # auto | balanced | none
    calibration_folds: int | str = "auto"  # auto | 0 (validation split) | K


def _tuning_run(options: ImageRunOptions, architecture: str, fingerprint: str) -> Manifest:
    """The checkpoint whose calibration a full refit reuses; it must be the same recipe on the same data."""
    if options.calibration_from is None:
        raise ValueError("--refit-full needs --calibration-from: a checkpoint of the same recipe trained with "
                         "its validation split (the refit has none to calibrate on)")
    reference = read_manifest(options.calibration_from)
    problems = []
    if reference.task != "image" or reference.architecture != architecture:
        problems.append(f"it is a {reference.task}/{reference.architecture} checkpoint, not image/{architecture}")
    if reference.data_fingerprint != fingerprint:
        problems.append("it was trained on different data (its data fingerprint differs)")
    if "temperature" not in reference.calibration or "validation" not in reference.metrics:
        problems.append("it has no calibration or validation metrics")
    if problems:
        raise ValueError(f"--calibration-from {options.calibration_from}: {'; '.join(problems)}")
    return reference


def _new_model(options: ImageRunOptions, classes: list[str],
               images: torch.Tensor) -> tuple[nn.Module, ImagePreprocessing]:
    """A fresh ``options.architecture`` model with the recipe's config, and the preprocessing fitted to
    ``images`` (the training images), whose first 5,000 also set a whitening stem."""
    recipe_model = IMAGE_RECIPES.get(options.architecture, {}).get("model", {})
    model = build_model(options.architecture, {"num_classes": len(classes), **recipe_model, **options.model_config})
    preprocessing = ImagePreprocessing.from_images(images, IMAGE_SIZE)
    if hasattr(model, "init_whitening"):
        cast(Any, model).init_whitening(preprocessing.normalize(images[:5000]))
    return model, preprocessing


def _recipe(options: ImageRunOptions, architecture: str, transfer: bool) -> tuple[LoopConfig, int, str]:
    """The architecture's recipe with the command line's overrides: (loop, batch size, flip mode)."""
    recipe = {**IMAGE_RECIPES.get(architecture, IMAGE_RECIPES["fastconv"]), **options.loop}
    batch_size = options.batch_size or recipe.pop("batch_size")
    recipe.pop("batch_size", None)
    flip = recipe.pop("flip", "random")
    recipe.pop("model", None)
    if transfer and "lr" not in options.loop:
        recipe["lr"] = recipe["lr"] / 4  # gentler for transfer; --lr overrides
    loop_fields = {f.name for f in dataclasses.fields(LoopConfig)}
    return LoopConfig(seed=options.seed, **{k: v for k, v in recipe.items() if k in loop_fields}), batch_size, flip


def recipe_for_finetune(options: ImageRunOptions, architecture: str) -> tuple[LoopConfig, int, str]:
    """The architecture's recipe for fine-tuning (a gentler rate): (loop, batch size, flip mode)."""
    return _recipe(options, architecture, transfer=True)


def run_image_training(options: ImageRunOptions) -> dict[str, Any]:
    device = pick_device(options.device)
    torch.manual_seed(options.seed)  # model initialisation is part of the reproducible run
    data = load_image_folder(options.data, size=IMAGE_SIZE)
    if options.refit_full:
        if options.parent is not None:
            raise ValueError("--refit-full is for pretrain-image (from scratch), not for fine-tuning")
        return _refit_full(options, data, device)
    if options.parent is not None:
        from training.image.finetune import run_image_finetune

        return run_image_finetune(options, data, device)
    check_enough_examples(data.labels, data.classes)
    train_idx, val_idx = stratified_split(data.labels, options.validation_fraction, options.seed)
    if options.limit:
        train_idx = train_idx[torch.randperm(len(train_idx), generator=seeded_generator(options.seed))[:options.limit]]
    train, validation = data.subset(train_idx), data.subset(val_idx)
    architecture = options.architecture
    model, preprocessing = _new_model(options, data.classes, train.images)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    loop, batch_size, flip = _recipe(options, architecture, transfer=False)
    batch_size = options.batch_size or adapt_batch_size(batch_size, len(train))
    source = ImageBatches(train, batch_size, options.seed, preprocessing, flip=flip)
    if "epochs" not in options.loop:
        loop = dataclasses.replace(loop, epochs=adapt_epochs(loop.epochs, source.steps_per_epoch(), min_total_steps=0))
    state_dir = options.output.parent / f".{options.output.name}.train-state"

    def validate(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_logits(m, evaluation_batches(validation, preprocessing), device, loop.precision)

    # The per-epoch curve: a fixed slice of the validation split without translate TTA, so that
    # watching the run costs seconds, not minutes; the final metrics use all of it, fully augmented.
    shuffled = torch.randperm(len(validation), generator=seeded_generator(options.seed))
    monitor = validation.subset(shuffled[:EPOCH_VALIDATION_IMAGES])

    def validate_epoch(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with without_translate_tta(m):
            return predict_logits(m, evaluation_batches(monitor, preprocessing), device, loop.precision)

    history = fit(model, source, loop, device=device, validate=validate_epoch, state_dir=state_dir,
                  stop_after_steps=options.stop_after_steps, description=architecture)
    if options.stop_after_steps is not None and len(history) < loop.epochs:
        return {"stopped": True, "state": str(state_dir)}
    val_logits, val_labels = validate(model)
    manifest = new_manifest(
        options.name or options.output.name, "image", architecture, model.config,  # type: ignore[arg-type]
        classes=data.classes,
        preprocessing=preprocessing.to_dict(),
        data_fingerprint=data.fingerprint,
        training_command=options.command,
    )
    extra = {"train_images": len(train), "validation_images": len(validation),
             "train_seconds": sum(row["seconds"] for row in history), "device": str(device),
             "loop": dataclasses.asdict(loop), "batch_size": batch_size, "flip": flip}
    summary = finish_checkpoint(options.output, model, manifest, val_logits, val_labels, history, extra_metrics=extra)
    discard_training_state(state_dir)
    return summary


def _refit_full(options: ImageRunOptions, data: ImageDataset, device: torch.device) -> dict[str, Any]:
    """The recipe on every image; calibration and validation metrics come from the tuning run."""
    architecture = options.architecture
    reference = _tuning_run(options, architecture, data.fingerprint)
    model, preprocessing = _new_model(options, data.classes, data.images)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    loop, batch_size, flip = _recipe(options, architecture, transfer=False)
    state_dir = options.output.parent / f".{options.output.name}.train-state"
    history = fit(model, ImageBatches(data, batch_size, options.seed, preprocessing, flip=flip), loop, device=device,
                  state_dir=state_dir, stop_after_steps=options.stop_after_steps, description=f"{architecture} (all)")
    if options.stop_after_steps is not None and len(history) < loop.epochs:
        return {"stopped": True, "state": str(state_dir)}
    validation = dict(reference.metrics["validation"])
    validation.update(
        measured_on=lineage(options.calibration_from),
        note=f"validation metrics and calibration of {reference.name!r} (same recipe and seed, trained without "
             f"its {validation.get('validation_images', '?')} validation images); this model trained on all "
             f"{len(data)} images, so it has no held-out split of its own",
        train_images=len(data), validation_images=0, refit_full=True, history=history,
        train_seconds=sum(row["seconds"] for row in history), device=str(device),
        loop=dataclasses.asdict(loop), batch_size=batch_size, flip=flip,
    )
    manifest = new_manifest(
        options.name or options.output.name, "image", architecture, model.config,  # type: ignore[arg-type]
        classes=data.classes,
        preprocessing=preprocessing.to_dict(),
        data_fingerprint=data.fingerprint, training_command=options.command or command_line(),
        calibration=dict(reference.calibration), metrics={"validation": validation},
    )
    manifest = dataclasses.replace(manifest, code_version=code_version())
    save_checkpoint(options.output, model.cpu(), manifest)
    plot_training_curves(history, options.output.parent / f"{options.output.name}.curves.png",
                         f"{manifest.name} training (all {len(data)} images)")
    discard_training_state(state_dir)
    summary = {"checkpoint": str(options.output), "train_images": len(data), "refit_full": True,
               "temperature": reference.calibration["temperature"], "calibration_from": reference.name,
               "train_seconds": validation["train_seconds"], "weights_sha256": sha256_file(options.output / "model.safetensors")}
    logger.info("wrote %s: %s", options.output, json.dumps(summary))
    return summary
