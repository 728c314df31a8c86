"""``finetune-fusion``: from a pair manifest to a calibrated multimodal checkpoint.

Late fusion (``training.fusion.late``, the default) or joint fusion (``training.fusion.joint``),
prepared by ``training.fusion.prep``; then temperature-calibrated on the validation split and
written with a manifest naming both parents, the metrics of each modality alone and together, and
a TF-IDF + linear SVM reference on the same split. With ``refit_full`` or ``calibration_folds``
(late fusion) the recipe is then fitted again on every pair, and that model ships with the held-out
temperature and metrics (``training.engine.refit``). ``FusionTrainer`` is those steps as the
trainer stages of ``training.engine.trainer``; ``run_fusion_training`` runs them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import new_manifest
from models.fusion import JointFusionClassifier
from models.sentence_encoder import SENTENCE_VOCAB_FILE
from training.engine.adaptive import adapt_batch_size, check_enough_examples, resolve_folds
from training.engine.common import finish_checkpoint, pick_device
from training.engine.loop import predict_logits
from training.engine.metrics import classification_metrics
from training.engine.refit import HeldOut, refit_record
from training.engine.trainer import run_trainer
from training.fusion.joint import build_joint, joint_eval_batches, train_joint
from training.fusion.late import LateEncoded, build_late, train_late_head
from training.fusion.prep import (
    ARCHITECTURES,
    DEFAULT_BATCH_SIZE,
    FusionOptions,
    Prepared,
    fusion_recipe,
    metrics_by_modality,
    prepare,
)

logger = logging.getLogger(__name__)

def tfidf_svm_reference(prep: Prepared) -> dict[str, float]:
    """TF-IDF (word 1–2-grams + char_wb 2–5) + LinearSVC on the texts of this run's split: the reference row."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    texts = prep.data.texts
    train, val = prep.train_idx.tolist(), prep.val_idx.tolist()
    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
    x_train = hstack([words.fit_transform([texts[i] for i in train]), chars.fit_transform([texts[i] for i in train])]).tocsr()
    x_val = hstack([words.transform([texts[i] for i in val]), chars.transform([texts[i] for i in val])]).tocsr()
    predicted = torch.from_numpy(LinearSVC(C=1.0).fit(x_train, prep.data.labels[train].numpy()).predict(x_val))
    labels = prep.data.labels[val]
    one_hot = torch.nn.functional.one_hot(predicted, len(prep.data.classes)).float() * 10
    metrics = classification_metrics(one_hot, labels, prep.data.classes)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def preprocessing_dict(prep: Prepared) -> dict[str, Any]:
    values: dict[str, Any] = {
        "kind": "multimodal",
        "image": prep.image.to_dict(),
        "text": prep.preprocessing.to_dict(),
        "inputs": "model(images, token_ids, image_mask, text_mask); see models.fusion.FUSION_INPUTS",
    }
    if prep.sentence is not None:
        values["sentence"] = {"kind": "wordpiece", "vocab_file": SENTENCE_VOCAB_FILE, "lowercase": True,
                              "max_tokens": prep.sentence.tokenizer.max_tokens}
        values["inputs"] = "model(images, token_ids, image_mask, text_mask, sentence_ids); see models.fusion.FUSION_INPUTS"
    return values


def parents(prep: Prepared, copied: dict[str, list[str]]) -> dict[str, Any] | None:
    record: dict[str, Any] = {}
    if prep.image_parent is not None:
        record["image"] = {**prep.image_parent.lineage(), "copied_tensors": len(copied.get("image", copied.get("joint", [])))}
    if prep.text_parent is not None:
        record["text"] = {**prep.text_parent.lineage(), "copied_tensors": len(copied.get("text", [])),
                          "vocabulary": "extended"}
    if prep.sentence is not None:
        record["sentence"] = {**prep.sentence.lineage, "copied_tensors": len(copied.get("sentence", []))}
    return record or None


def extra_files(prep: Prepared) -> dict[str, bytes]:
    """The files beside the weights: the fusion vocabulary, and the sentence encoder's WordPiece vocabulary."""
    files = {prep.preprocessing.vocab_file: prep.vocabulary.to_json_bytes()}
    if prep.sentence is not None:
        files[SENTENCE_VOCAB_FILE] = prep.sentence.tokenizer.to_json_bytes()
    return files


@dataclasses.dataclass
class FusionRun:
    """The prepared run, with the options as resolved for it (batch size adapted, folds chosen)."""

    options: FusionOptions
    prep: Prepared  # the validation split (the folds and a refit prepare their own)
    folds: int  # 0: the validation split
    output: Path
    device: torch.device


@dataclasses.dataclass
class BuiltFusion:
    """The model to train on the split: a late model with fitted scorers, or a joint one; neither when cross-fitting."""

    late: LateEncoded | None = None
    joint: JointFusionClassifier | None = None
    copied: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FittedFusion:
    model: nn.Module
    copied: dict[str, list[str]]
    history: list[dict[str, float]]
    logits: dict[str, torch.Tensor]  # held out (fused and by modality): the split's, or out-of-fold ones of every pair
    val_labels: torch.Tensor
    shipped: Prepared  # what the written model was fitted on: the split, or every pair after a refit
    refit: dict[str, Any]  # the refit's manifest entries (training.engine.refit); empty without one


class FusionTrainer:
    task = "multimodal"

    def prepare(self, options: FusionOptions) -> FusionRun:
        output = options.output
        if output is None:
            raise ValueError("finetune-fusion needs --output")
        if options.refit_full and options.arch != "late":
            raise ValueError("--refit-full is for late fusion: joint fusion has no cheap second fit")
        device = pick_device(options.device)
        prep = prepare(dataclasses.replace(options, refit_full=False, fold=None))
        folds = 0
        if options.arch == "late" and not options.limit:
            folds = resolve_folds(options.calibration_folds, len(prep.data), options.validation_fraction)
        elif options.calibration_folds not in (0, "0", "auto"):
            raise ValueError("--calibration-folds is for late fusion on every pair (not joint, not with --limit)")
        check_enough_examples(prep.data.labels, prep.data.classes, folds)
        if options.batch_size is None:  # a few dozen pairs still make several batches an epoch
            options = dataclasses.replace(options, batch_size=adapt_batch_size(DEFAULT_BATCH_SIZE, len(prep.train_idx)))
        if folds:
            options = dataclasses.replace(options, refit_full=True, calibration_folds=folds)
        return FusionRun(options, prep, folds, output, device)

    def build(self, options: FusionOptions, run: FusionRun) -> BuiltFusion:
        options, prep = run.options, run.prep
        if run.folds:
            return BuiltFusion()
        if options.arch == "late":
            encoded = build_late(prep, options, options.seed)
            return BuiltFusion(late=encoded, copied=encoded.copied)
        joint, copied = build_joint(prep, options.seed)
        return BuiltFusion(joint=joint, copied=copied)

    def fit(self, options: FusionOptions, run: FusionRun, built: BuiltFusion) -> FittedFusion:
        options, prep, folds, cpu = run.options, run.prep, run.folds, torch.device("cpu")
        val_labels = prep.data.labels[prep.val_idx]
        if folds:
            logits = _cross_fitted_late_logits(options, prep, folds)
            shipped = prepare(dataclasses.replace(options, fold=None), prep.image_parent, prep.text_parent,
                              data=prep.data, token_lists=prep.token_lists, sentence=prep.sentence)
            refit = build_late(shipped, options, options.seed)
            history, _ = train_late_head(refit, shipped, options, options.seed, cpu)
            record = refit_record(HeldOut.folds(folds, "pairs"), len(shipped.train_idx), "pairs",
                                  caveat="the TF-IDF reference is scored on the validation split alone")
            return FittedFusion(refit.model, refit.copied, history, logits, prep.data.labels, shipped, record)
        if built.joint is not None:
            history, logits = train_joint(built.joint, prep, options, options.seed, run.device)
            return FittedFusion(built.joint, built.copied, history, logits, val_labels, prep, {})
        encoded = built.late
        assert encoded is not None
        history, logits = train_late_head(encoded, prep, options, options.seed, cpu)
        # the real forward (encoders included) must agree with the cached-feature head up to the text
        # scores of train rows, which were out-of-fold; validation rows used the fitted bag in both
        batches = joint_eval_batches(prep, prep.val_idx, options.modalities, 10**6)
        val_logits = predict_logits(encoded.model, batches, cpu, "fp32")[0]
        if not torch.allclose(val_logits, logits["fused"], atol=1e-3, rtol=1e-3):
            raise RuntimeError("internal error: the late model's forward disagrees with its cached features")
        if not options.refit_full:
            return FittedFusion(encoded.model, encoded.copied, history, logits, val_labels, prep, {})
        # the split run above gave the validation metrics and the temperature; the same recipe and
        # seed now fit the vocabulary, both scorers and the head on every pair, and that model ships
        shipped = prepare(options, prep.image_parent, prep.text_parent, data=prep.data, token_lists=prep.token_lists,
                          sentence=prep.sentence)
        refit = build_late(shipped, options, options.seed)
        train_late_head(refit, shipped, options, options.seed, cpu)
        logger.info("refit on all %d pairs; validation metrics and temperature are the split run's", len(shipped.train_idx))
        record = refit_record(HeldOut.split(len(prep.val_idx), len(prep.train_idx), "pairs"), len(shipped.train_idx),
                              "pairs")
        return FittedFusion(refit.model, refit.copied, history, logits, val_labels, shipped, record)

    def export(self, options: FusionOptions, run: FusionRun, fitted: FittedFusion) -> dict[str, Any]:
        options, prep, shipped, val_labels = run.options, run.prep, fitted.shipped, fitted.val_labels
        model = fitted.model
        manifest = new_manifest(
            options.name or run.output.name, "multimodal", ARCHITECTURES[options.arch], model.config,  # type: ignore[arg-type]
            classes=prep.data.classes, preprocessing=preprocessing_dict(shipped), data_fingerprint=prep.data.fingerprint,
            parent=parents(shipped, fitted.copied), training_command=options.command,
        )
        extra = {
            "by_modality": metrics_by_modality(fitted.logits, val_labels, prep.data.classes),
            "reference_tfidf_svm": tfidf_svm_reference(prep),
            "majority_accuracy": float(torch.bincount(val_labels).max() / len(val_labels)),
            "train_pairs": len(shipped.train_idx), "validation_pairs": len(val_labels), "split_seed": options.split_seed,
            "calibration_folds": run.folds,
            "modalities": list(options.modalities), "image_size": prep.image.size,
            "modality_dropout": options.modality_dropout,
            "class_weighting": fusion_recipe(options).extra["class_weighting"],
            "bag": dataclasses.asdict(options.bag), "text_scorer": dataclasses.asdict(options.text_scorer),
            "image_scorer": dataclasses.asdict(options.image_scorer), "batch_size": options.batch_size,
        }
        if prep.sentence is not None:
            extra["sentence_scorer"] = dataclasses.asdict(options.sentence_scorer)
        extra.update(fitted.refit)
        summary = finish_checkpoint(run.output, model, manifest, fitted.logits["fused"], val_labels, fitted.history,
                                    extra_files=extra_files(shipped),
                                    extra_metrics=extra)
        summary["by_modality"] = extra["by_modality"]
        summary["reference_tfidf_svm"] = extra["reference_tfidf_svm"]
        return summary


def run_fusion_training(options: FusionOptions) -> dict[str, Any]:
    """``finetune-fusion``: prepare, train, calibrate, write the checkpoint; returns a summary."""
    return run_trainer(FusionTrainer(), options)


def _cross_fitted_late_logits(options: FusionOptions, prep: Prepared, folds: int) -> dict[str, torch.Tensor]:
    """Out-of-fold logits of every pair (fused and by modality): fold k is scored by the late recipe
    fitted on the other folds, vocabulary and scorers included."""
    count, classes = len(prep.data), len(prep.data.classes)
    logits: dict[str, torch.Tensor] = {}
    for fold in range(folds):
        fold_prep = prepare(dataclasses.replace(options, fold=fold, refit_full=False), prep.image_parent,
                            prep.text_parent, data=prep.data, token_lists=prep.token_lists, sentence=prep.sentence)
        encoded = build_late(fold_prep, options, options.seed)
        _, fold_logits = train_late_head(encoded, fold_prep, options, options.seed, torch.device("cpu"))
        for name, values in fold_logits.items():
            logits.setdefault(name, torch.empty(count, classes))[fold_prep.val_idx] = values
        accuracy = float((fold_logits["fused"].argmax(dim=1) == prep.data.labels[fold_prep.val_idx]).float().mean())
        logger.info("fold %d/%d: %d held-out pairs, accuracy %.4f", fold + 1, folds, len(fold_prep.val_idx), accuracy)
    return logits
