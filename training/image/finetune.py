"""Fine-tuning an image checkpoint on a user's own folder, with the recipe adapted to its size.

Small data (the median class under a few hundred images): the pretrained backbone stays frozen
and the new classifier is a logistic regression on its features, calibrated on out-of-fold
predictions of every image (``training.image.head_fit``). Larger data: the whole network trains through
the shared loop with the batch size, epochs and learning rate scaled to the data, and calibration
on K-fold out-of-fold logits (small sets) or a validation split (large ones). What was chosen is
recorded in the manifest's metrics under ``plan``; calibrating on out-of-fold logits and shipping the
fit on every image is a refit (``training.engine.refit``) and carries its note.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, cast

import torch
from torch import nn

from models.checkpoint import LoadedCheckpoint, load_checkpoint, new_manifest
from models.preprocessing import ImagePreprocessing
from training.engine.adaptive import (
    DEFAULT_FOLDS,
    DataPlan,
    adapt_batch_size,
    adapt_epochs,
    check_enough_examples,
    out_of_fold_logits,
    resolve_class_weights,
    resolve_folds,
    resolve_freeze,
)
from training.engine.common import finish_checkpoint, lineage, pick_device
from training.engine.loop import discard_training_state, fit, predict_logits, seeded_generator
from training.engine.refit import HeldOut, refit_record
from training.image.data import ImageDataset, load_image_folder, stratified_split
from training.image.head_fit import cross_fit_head
from training.image.task import IMAGE_SIZE, ImageBatches, ImageRunOptions, evaluation_batches, recipe_for_finetune

logger = logging.getLogger(__name__)


def freeze_backbone(model: nn.Module) -> int:
    """Freeze every parameter but the classifier's (``head`` or ``classifier``'s last layer); returns how many."""
    head = getattr(model, "head", None)
    if head is None:
        classifier = getattr(model, "classifier", None)
        head = classifier[-1] if isinstance(classifier, nn.Sequential) else classifier
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no classifier layer to train alone; use --freeze none")
    trainable = {id(p) for p in head.parameters()}
    frozen = 0
    for parameter in model.parameters():
        if id(parameter) not in trainable:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


@torch.inference_mode()
def head_features(model: nn.Module, data: ImageDataset, preprocessing: ImagePreprocessing) -> torch.Tensor:
    """(N, D) features the classifier reads, over the model's test-time views, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([cast(Any, model).head_features(images.to(device)).float().cpu()
                      for (images,), _ in evaluation_batches(data, preprocessing)])


def plan_finetune(options: ImageRunOptions, data: ImageDataset) -> DataPlan:
    folds = resolve_folds(options.calibration_folds, len(data), options.validation_fraction)
    counts = check_enough_examples(data.labels, data.classes, folds)
    return DataPlan(examples=len(data), examples_per_class=counts, calibration_folds=folds,
                    freeze=resolve_freeze(options.freeze, counts),
                    class_weights=resolve_class_weights(options.class_weights, data.labels, len(data.classes)))


@dataclasses.dataclass
class FinetuneRun:
    """The prepared fine-tune: the parent, the (limited) data, the plan adapted to it."""

    device: torch.device
    data: ImageDataset
    loaded: LoadedCheckpoint
    plan: DataPlan
    preprocessing: ImagePreprocessing  # the parent's: the child standardises as its parent did


@dataclasses.dataclass
class FittedFinetune:
    model: nn.Module
    val_logits: torch.Tensor  # held-out logits: the split's, or out-of-fold ones of every image
    val_labels: torch.Tensor
    history: list[dict[str, float]]
    plan: DataPlan
    details: dict[str, Any]


class ImageFinetuneTrainer:
    """``finetune-image``: prepare (parent, plan) → build (new classifier) → fit (head fit, folds or split) → export."""

    task = "image"

    def prepare(self, options: ImageRunOptions) -> FinetuneRun:
        device = pick_device(options.device)
        torch.manual_seed(options.seed)
        data = load_image_folder(options.data, size=IMAGE_SIZE)
        loaded = load_checkpoint(cast(Any, options.parent))
        parent = loaded.manifest
        if parent.task != "image":
            raise ValueError(f"{options.parent} is a {parent.task} checkpoint, not an image one")
        if parent.architecture == "image_ensemble":
            raise ValueError(f"{options.parent} is an ensemble; fine-tune from one of its members (its manifest's "
                             "parent.members names them)")
        if options.limit:
            order = torch.randperm(len(data), generator=seeded_generator(options.seed))
            data = data.subset(order[:options.limit].sort().values)
        plan = plan_finetune(options, data)
        return FinetuneRun(device, data, loaded, plan, ImagePreprocessing.from_manifest(parent))

    def build(self, options: ImageRunOptions, run: FinetuneRun) -> nn.Module:
        model = run.loaded.model
        if run.loaded.manifest.classes != run.data.classes:
            cast(Any, model).reset_classifier(len(run.data.classes))  # every image architecture has one
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        plan = run.plan
        logger.info("fine-tuning plan: %d images (%s), %s, freeze %s", plan.examples,
                    ", ".join(f"{k} {v}" for k, v in plan.examples_per_class.items()),
                    f"{plan.calibration_folds}-fold cross-fitted calibration" if plan.calibration_folds
                    else "validation split", plan.freeze)
        return model

    def fit(self, options: ImageRunOptions, run: FinetuneRun, model: nn.Module) -> FittedFinetune:
        data, plan, device, preprocessing = run.data, run.plan, run.device, run.preprocessing
        architecture = run.loaded.manifest.architecture
        if plan.freeze == "backbone" and hasattr(model, "head_features"):
            model.to(device)
            features = head_features(model, data, preprocessing)
            folds = plan.calibration_folds or DEFAULT_FOLDS
            head = cross_fit_head(features, data.labels, len(data.classes), folds, options.seed, plan.class_weights)
            cast(Any, model).set_head(head.weight.to(device))
            plan = dataclasses.replace(plan, calibration_folds=folds)
            details: dict[str, Any] = {"method": "logistic regression on the frozen backbone's features", "l2": head.l2,
                                       "train_images": len(data), "validation_images": len(data),
                                       "validation": f"{folds}-fold out-of-fold predictions of every image",
                                       **refit_record(HeldOut.folds(folds, "images"), len(data), "images")}
            return FittedFinetune(model, head.out_of_fold_logits, data.labels, [], plan, details)
        if plan.freeze == "backbone":
            frozen = freeze_backbone(model)
            logger.info("backbone frozen: %d parameters", frozen)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        if plan.calibration_folds:
            def score(fold: int, train: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
                model.load_state_dict(initial)
                _train(options, architecture, model, data.subset(train), plan, device, preprocessing, f"fold {fold + 1}")
                return predict_logits(model, evaluation_batches(data.subset(held), preprocessing), device)[0]

            logits = out_of_fold_logits(data.labels, len(data.classes), plan.calibration_folds, options.seed, score)
            model.load_state_dict(initial)
            history, details = _train(options, architecture, model, data, plan, device, preprocessing, "all")
            details.update(train_images=len(data), validation_images=len(data),
                           validation=f"{plan.calibration_folds}-fold out-of-fold predictions of every image",
                           **refit_record(HeldOut.folds(plan.calibration_folds, "images"), len(data), "images"))
            return FittedFinetune(model, logits, data.labels, history, plan, details)
        train_idx, val_idx = stratified_split(data.labels, options.validation_fraction, options.seed)
        train, validation = data.subset(train_idx), data.subset(val_idx)
        history, details = _train(options, architecture, model, train, plan, device, preprocessing, "train",
                                  validation)
        val_logits, val_labels = predict_logits(model, evaluation_batches(validation, preprocessing), device)
        details.update(train_images=len(train), validation_images=len(validation))
        return FittedFinetune(model, val_logits, val_labels, history, plan, details)

    def export(self, options: ImageRunOptions, run: FinetuneRun, fitted: FittedFinetune) -> dict[str, Any]:
        return _write(options, fitted.model, run.loaded.manifest, run.data, fitted.val_logits, fitted.val_labels,
                      fitted.history, fitted.plan, fitted.details, run.preprocessing)


def _train(options: ImageRunOptions, architecture: str, model: nn.Module, train: ImageDataset, plan: DataPlan,
           device: torch.device, preprocessing: ImagePreprocessing, label: str,
           validation: ImageDataset | None = None) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """The architecture's transfer recipe with batch size, epochs and learning rate scaled to ``train``."""
    loop, recipe_batch_size, flip = recipe_for_finetune(options, architecture)
    batch_size = options.batch_size or adapt_batch_size(recipe_batch_size, len(train))
    if "lr" not in options.loop:  # linear scaling with the batch size
        loop = dataclasses.replace(loop, lr=loop.lr * batch_size / recipe_batch_size)
    source = ImageBatches(train, batch_size, options.seed, preprocessing, flip=flip)
    if "epochs" not in options.loop:
        loop = dataclasses.replace(loop, epochs=adapt_epochs(loop.epochs, source.steps_per_epoch()))
    loop = dataclasses.replace(loop, class_weights=plan.class_weights)
    # named by data and seed too: a rerun on other data must not resume this one's folds
    tag = f"{label.replace(' ', '-')}-{train.fingerprint[:12]}-seed{options.seed}"
    state_dir = options.output.parent / f".{options.output.name}.train-state-{tag}"

    def validate(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        assert validation is not None
        return predict_logits(m, evaluation_batches(validation, preprocessing), device)

    history = fit(model, source, loop, device=device, validate=validate if validation is not None else None,
                  state_dir=state_dir, description=f"fine-tune ({label})")
    discard_training_state(state_dir)
    details = {"method": "fine-tuning through the training loop", "loop": dataclasses.asdict(loop),
               "batch_size": batch_size, "flip": flip, "train_seconds": sum(row["seconds"] for row in history)}
    return history, details


def _write(options: ImageRunOptions, model: nn.Module, parent: Any, data: ImageDataset, val_logits: torch.Tensor,
           val_labels: torch.Tensor, history: list[dict[str, float]], plan: DataPlan, details: dict[str, Any],
           preprocessing: ImagePreprocessing) -> dict[str, Any]:
    manifest = new_manifest(
        options.name or options.output.name, "image", parent.architecture, cast(Any, model).config,
        classes=data.classes,
        preprocessing=preprocessing.to_dict(),
        data_fingerprint=data.fingerprint,
        parent=lineage(options.parent),
        training_command=options.command,
    )
    extra = {**details, "plan": plan.to_dict(), "device": str(next(model.parameters()).device)}
    summary = finish_checkpoint(options.output, model, manifest, val_logits, val_labels, history, extra_metrics=extra)
    summary["plan"] = {"freeze": plan.freeze, "calibration_folds": plan.calibration_folds,
                       "class_weights": plan.class_weights is not None}
    return summary
