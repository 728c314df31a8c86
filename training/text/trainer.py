"""Text training as trainer stages (``training.engine.trainer``): ``train-text`` and ``finetune-text``.

A thin adapter over ``training.text.task``'s halves: prepare the split (or the folds), build the
model, train it and score the held-out posts, refit on every post when the run asks for it
(``training.engine.refit``), then calibrate on the held-out scores and write the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import new_manifest, read_manifest
from models.text_models import NgramBagClassifier, signed_power
from training.engine.adaptive import check_enough_examples, resolve_folds
from training.engine.calibration import fit_score_power
from training.engine.common import finish_checkpoint, lineage
from training.engine.loop import discard_training_state
from training.engine.refit import HeldOut, refit_record
from training.engine.trainer import Stopped
from training.text.task import (
    PreparedText,
    TextRunOptions,
    build_text_model,
    check_transfer_source,
    cross_fitted_logits,
    prepare_full_refit,
    prepare_text_run,
    text_recipe,
    train_text_model,
    validation_logits,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TextRun:
    """The prepared run, with the options as resolved for it (folds chosen, refit implied by folds)."""

    options: TextRunOptions
    prepared: PreparedText
    folds: int  # 0: the validation split
    output: Path
    state_dir: Path


@dataclasses.dataclass
class BuiltText:
    model: nn.Module | None  # None when cross-fitting: each fold, and the refit, build their own
    seconds: float


@dataclasses.dataclass
class FittedText:
    model: nn.Module
    history: list[dict[str, float]]
    val_logits: torch.Tensor  # held out: the split's, or out-of-fold ones of every post
    val_labels: torch.Tensor
    prepared: PreparedText  # what the shipped model was trained on (every post after a refit)
    details: dict[str, Any]


class TextTrainer:
    task = "text"

    def prepare(self, options: TextRunOptions) -> TextRun:
        output = options.output
        if output is None:
            raise ValueError("an output checkpoint directory is needed")
        if options.parent is not None:  # fail before tokenising anything
            check_transfer_source(read_manifest(options.parent), options.parent)
        subsampled = options.label_fraction < 1.0 or bool(options.limit)
        if (options.refit_full or options.calibration_folds not in (0, "auto")) and subsampled:
            raise ValueError("--refit-full and --calibration-folds train on every label (not with --label-fraction or --limit)")
        prepared = prepare_text_run(options)
        folds = 0 if subsampled and options.calibration_folds == "auto" else resolve_folds(
            options.calibration_folds, len(prepared.data), options.validation_fraction)
        check_enough_examples(prepared.data.labels, prepared.data.classes, folds)
        # Cross-fitting calibrates the model refit on every post: the folds' models are not shipped.
        options = dataclasses.replace(options, calibration_folds=folds, refit_full=options.refit_full or folds > 0)
        return TextRun(options, prepared, folds, output, output.parent / f".{output.name}.train-state")

    def build(self, options: TextRunOptions, run: TextRun) -> BuiltText:
        started = time.perf_counter()
        model = None if run.folds else build_text_model(run.options, run.prepared)
        return BuiltText(model, time.perf_counter() - started)

    def fit(self, options: TextRunOptions, run: TextRun, built: BuiltText) -> FittedText | Stopped:
        options, prepared, folds = run.options, run.prepared, run.folds
        started = time.perf_counter() - built.seconds
        model: nn.Module | None = None
        history: list[dict[str, float]] = []
        if folds:
            val_logits, val_labels = cross_fitted_logits(options, prepared, folds)
            details: dict[str, Any] = {"calibration_data": f"{folds}-fold out-of-fold logits of every post"}
            held_out = HeldOut.folds(folds, "posts")
        else:
            model, history, details = train_text_model(options, prepared, run.state_dir, model=built.model)
            details["train_seconds"] += built.seconds
            if options.stop_after_steps is not None and len(history) < int(details["loop"]["epochs"]):
                return Stopped(run.state_dir)
            val_logits, val_labels = validation_logits(model, prepared, options.device), prepared.val_labels
            held_out = HeldOut.split(len(prepared.val_ids), len(prepared.train_ids), "posts")
        if options.refit_full:
            # Validation metrics and the temperature stay those of the held-out fits above; the shipped
            # weights are the same recipe refit on every post.
            held_out_posts = len(val_labels)
            prepared = prepare_full_refit(options, prepared)
            model, history, refit = train_text_model(options, prepared, run.state_dir)
            details.update({k: v for k, v in refit.items() if k != "train_seconds"})
            details.update(refit_record(held_out, len(prepared.train_ids), "posts"),
                           refit_posts=len(prepared.train_ids), train_seconds=time.perf_counter() - started,
                           validation_posts=held_out_posts)
        assert model is not None  # trained on the split, or refit (always, after cross-fitting)
        if text_recipe(options).extra.get("calibrate_score_power") and isinstance(model, NgramBagClassifier):
            power = fit_score_power(val_logits, val_labels)
            model.config = dataclasses.replace(model.config, score_power=power)
            val_logits = signed_power(val_logits, power)
            details["score_power"] = power
            logger.info("calibration: scores raised to the power %.1f before temperature scaling", power)
        return FittedText(model, history, val_logits, val_labels, prepared, details)

    def export(self, options: TextRunOptions, run: TextRun, fitted: FittedText) -> dict[str, Any]:
        options, prepared, folds, model = run.options, fitted.prepared, run.folds, fitted.model
        manifest = new_manifest(
            options.name or run.output.name, "text", options.architecture, getattr(model, "config", None),
            classes=prepared.data.classes,
            preprocessing=prepared.preprocessing.to_dict(),
            data_fingerprint=prepared.data.fingerprint,
            parent=lineage(options.parent),
            training_command=options.command,
        )
        extra = {"train_posts": len(prepared.train_ids) - (len(prepared.val_ids) if options.refit_full else 0),
                 "validation_posts": len(prepared.val_ids),
                 "vocabulary_size": len(prepared.vocabulary), "label_fraction": options.label_fraction,
                 "split_seed": options.split_seed, "validation_fraction": options.validation_fraction,
                 "calibration_folds": folds, "class_weights": options.class_weights, **fitted.details}
        if folds:
            extra.update(train_posts=len(prepared.train_ids), validation_fraction=0.0)
        summary = finish_checkpoint(run.output, model, manifest, fitted.val_logits, fitted.val_labels, fitted.history,
                                    extra_files={prepared.preprocessing.vocab_file: prepared.vocabulary.to_json_bytes()},
                                    extra_metrics=extra)
        discard_training_state(run.state_dir)
        summary["train_seconds"] = fitted.details["train_seconds"]
        return summary
