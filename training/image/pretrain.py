"""Image pretraining as trainer stages: from an image folder to a calibrated checkpoint.

Two runs share the stages. By default a stratified validation split is held out: the model trains
on the rest, is validated and calibrated on it. With ``refit_full`` the same recipe and seed train
on every image and keep the calibration and validation metrics of ``calibration_from``, a run of
that recipe with its split (the meaning of a refit: ``training.engine.refit``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from models import build_model
from models.checkpoint import Manifest, new_manifest, read_manifest, save_checkpoint, sha256_file
from models.preprocessing import ImagePreprocessing
from training.engine.adaptive import adapt_batch_size, adapt_epochs, check_enough_examples
from training.engine.common import code_version, command_line, finish_checkpoint, lineage, pick_device
from training.engine.loop import LoopConfig, discard_training_state, fit, predict_logits, seeded_generator
from training.engine.metrics import plot_training_curves
from training.engine.refit import HeldOut, refit_record
from training.engine.trainer import Stopped
from training.image.data import ImageDataset, load_image_folder, stratified_split
from training.image.task import (
    EPOCH_VALIDATION_IMAGES,
    IMAGE_SIZE,
    ImageBatches,
    ImageRunOptions,
    _recipe,
    evaluation_batches,
    image_recipe,
    without_translate_tta,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ImageRun:
    """The prepared run: the data, what the model trains on, and what validates it."""

    device: torch.device
    data: ImageDataset
    train: ImageDataset  # every image for a refit
    validation: ImageDataset | None  # None for a refit: ``reference`` measured it
    reference: Manifest | None = None  # refit: the tuning run whose calibration it keeps


@dataclasses.dataclass
class BuiltImageModel:
    model: nn.Module
    preprocessing: ImagePreprocessing  # fitted to the training images


@dataclasses.dataclass
class FittedImageModel:
    model: nn.Module
    preprocessing: ImagePreprocessing
    history: list[dict[str, float]]
    loop: LoopConfig
    batch_size: int
    flip: str
    state_dir: Path
    val_logits: torch.Tensor | None = None  # None for a refit
    val_labels: torch.Tensor | None = None


def _state_dir(options: ImageRunOptions) -> Path:
    return options.output.parent / f".{options.output.name}.train-state"


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


class ImagePretrainTrainer:
    """``pretrain-image``: prepare (split, or the tuning run of a refit) → build → fit → export."""

    task = "image"

    def prepare(self, options: ImageRunOptions) -> ImageRun:
        device = pick_device(options.device)
        torch.manual_seed(options.seed)  # model initialisation is part of the reproducible run
        data = load_image_folder(options.data, size=IMAGE_SIZE)
        if options.refit_full:
            if options.parent is not None:
                raise ValueError("--refit-full is for pretrain-image (from scratch), not for fine-tuning")
            reference = _tuning_run(options, options.architecture, data.fingerprint)
            return ImageRun(device, data, train=data, validation=None, reference=reference)
        check_enough_examples(data.labels, data.classes)
        split_seed = options.seed if options.split_seed is None else options.split_seed
        train_idx, val_idx = stratified_split(data.labels, options.validation_fraction, split_seed)
        if options.limit:
            train_idx = train_idx[torch.randperm(len(train_idx), generator=seeded_generator(options.seed))[:options.limit]]
        return ImageRun(device, data, train=data.subset(train_idx), validation=data.subset(val_idx))

    def build(self, options: ImageRunOptions, run: ImageRun) -> BuiltImageModel:
        """A fresh model with the recipe's config, and the preprocessing fitted to the training images,
        whose first 5,000 also set a whitening stem."""
        images = run.train.images
        config = {"num_classes": len(run.data.classes), **image_recipe(options, options.architecture).model}
        model = build_model(options.architecture, config)
        preprocessing = ImagePreprocessing.from_images(images, IMAGE_SIZE)
        if hasattr(model, "init_whitening"):
            cast(Any, model).init_whitening(preprocessing.normalize(images[:5000]))
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return BuiltImageModel(model, preprocessing)

    def fit(self, options: ImageRunOptions, run: ImageRun, built: BuiltImageModel) -> FittedImageModel | Stopped:
        model, preprocessing, device = built.model, built.preprocessing, run.device
        loop, batch_size, flip = _recipe(options, options.architecture, transfer=False)
        state_dir = _state_dir(options)
        validation = run.validation
        if validation is None:  # a refit, on every image: the recipe's batch size and epochs, not adapted
            source = ImageBatches(run.train, batch_size, options.seed, preprocessing, flip=flip)
            history = fit(model, source, loop, device=device, state_dir=state_dir,
                          stop_after_steps=options.stop_after_steps, description=f"{options.architecture} (all)")
            if options.stop_after_steps is not None and len(history) < loop.epochs:
                return Stopped(state_dir)
            return FittedImageModel(model, preprocessing, history, loop, batch_size, flip, state_dir)
        batch_size = options.batch_size or adapt_batch_size(batch_size, len(run.train))
        source = ImageBatches(run.train, batch_size, options.seed, preprocessing, flip=flip)
        if "epochs" not in options.loop:
            loop = dataclasses.replace(loop, epochs=adapt_epochs(loop.epochs, source.steps_per_epoch(), min_total_steps=0))

        # The per-epoch curve: a fixed slice of the validation split without translate TTA, so that
        # watching the run costs seconds, not minutes; the final metrics use all of it, fully augmented.
        shuffled = torch.randperm(len(validation), generator=seeded_generator(options.seed))
        monitor = validation.subset(shuffled[:EPOCH_VALIDATION_IMAGES])

        def validate_epoch(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            with without_translate_tta(m):
                return predict_logits(m, evaluation_batches(monitor, preprocessing), device, loop.precision)

        history = fit(model, source, loop, device=device, validate=validate_epoch, state_dir=state_dir,
                      stop_after_steps=options.stop_after_steps, description=options.architecture)
        if options.stop_after_steps is not None and len(history) < loop.epochs:
            return Stopped(state_dir)
        val_logits, val_labels = predict_logits(model, evaluation_batches(validation, preprocessing), device,
                                                loop.precision)
        return FittedImageModel(model, preprocessing, history, loop, batch_size, flip, state_dir, val_logits, val_labels)

    def export(self, options: ImageRunOptions, run: ImageRun, fitted: FittedImageModel) -> dict[str, Any]:
        if run.reference is not None:
            return self._export_refit(options, run, run.reference, fitted)
        assert run.validation is not None and fitted.val_logits is not None and fitted.val_labels is not None
        model, history = fitted.model, fitted.history
        manifest = new_manifest(
            options.name or options.output.name, "image", options.architecture, model.config,  # type: ignore[arg-type]
            classes=run.data.classes,
            preprocessing=fitted.preprocessing.to_dict(),
            data_fingerprint=run.data.fingerprint,
            training_command=options.command,
        )
        extra = {"train_images": len(run.train), "validation_images": len(run.validation),
                 "train_seconds": sum(row["seconds"] for row in history), "device": str(run.device),
                 "loop": dataclasses.asdict(fitted.loop), "batch_size": fitted.batch_size, "flip": fitted.flip,
                 "split": {"fraction": options.validation_fraction,
                           "seed": options.seed if options.split_seed is None else options.split_seed}}
        summary = finish_checkpoint(options.output, model, manifest, fitted.val_logits, fitted.val_labels, history,
                                    extra_metrics=extra, top_label=True)
        discard_training_state(fitted.state_dir)
        return summary

    def _export_refit(self, options: ImageRunOptions, run: ImageRun, reference: Manifest,
                      fitted: FittedImageModel) -> dict[str, Any]:
        """The refit's checkpoint: its weights, the tuning run's calibration and validation metrics."""
        data, model, history = run.data, fitted.model, fitted.history
        validation = dict(reference.metrics["validation"])
        held_out = HeldOut.split(validation.get("validation_images", "?"), validation.get("train_images", "?"),
                                 "images", run=reference.name)
        validation.update(refit_record(
            held_out, len(data), "images", measured_on=lineage(options.calibration_from),
            train_images=len(data), validation_images=0, history=history,
            train_seconds=sum(row["seconds"] for row in history), device=str(run.device),
            loop=dataclasses.asdict(fitted.loop), batch_size=fitted.batch_size, flip=fitted.flip,
        ))
        manifest = new_manifest(
            options.name or options.output.name, "image", options.architecture, model.config,  # type: ignore[arg-type]
            classes=data.classes,
            preprocessing=fitted.preprocessing.to_dict(),
            data_fingerprint=data.fingerprint, training_command=options.command or command_line(),
            calibration=dict(reference.calibration), metrics={"validation": validation},
        )
        manifest = dataclasses.replace(manifest, code_version=code_version())
        save_checkpoint(options.output, model.cpu(), manifest)
        plot_training_curves(history, options.output.parent / f"{options.output.name}.curves.png",
                             f"{manifest.name} training (all {len(data)} images)")
        discard_training_state(fitted.state_dir)
        summary = {"checkpoint": str(options.output), "train_images": len(data), "refit_full": True,
                   "temperature": reference.calibration["temperature"], "calibration_from": reference.name,
                   "train_seconds": validation["train_seconds"],
                   "weights_sha256": sha256_file(options.output / "model.safetensors")}
        logger.info("wrote %s: %s", options.output, json.dumps(summary))
        return summary
