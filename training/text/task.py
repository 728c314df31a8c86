"""Text training: from a labelled text set to a calibrated ``text`` checkpoint.

One entry point, ``run_text_training``, serves ``train-text`` (any text architecture from scratch)
and ``finetune-text`` (a ``trunk`` text model whose shared trunk comes from an image checkpoint);
its stages (``training.engine.trainer``) are ``training.text.trainer``'s over the halves here:
``prepare_text_run``, ``build_text_model`` and ``train_text_model``, which the transfer study calls too.

Recipes (``TEXT_RECIPES``) hold what is known to work per architecture on 2 CPU cores: the
preprocessing, the loop settings and, in ``extra``, the vocabulary limits and the n-gram fit. The
validation split is stratified with a fixed ``split_seed`` (0) so every run and every arm of the
study sees the same one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import build_model
from models.checkpoint import Manifest, load_state_dict
from models.text_encoding import TextPreprocessing, Vocabulary, pad_batch
from models.text_models import NgramBagClassifier
from models.trunk import TrunkClassifier, TrunkTransferError, copy_trunk
from training.engine.adaptive import (
    adapt_batch_size,
    adapt_epochs,
    out_of_fold_logits,
    resolve_class_weights,
)
from training.engine.common import pick_device
from training.engine.loop import Batch, fit, predict_logits, seeded_generator
from training.engine.options import RunOptions
from training.engine.recipe import Recipe, merge_recipes
from training.engine.trainer import run_trainer
from training.text.data import TextDataset, cached_tokens, label_budget, load_text_data, stratified_split
from training.text.ngram import NgramOptions, build_ngram_model, fit_ngram_model

logger = logging.getLogger(__name__)

HEADER_FIELDS = ("subject", "from", "organization")

TEXT_RECIPES: dict[str, Recipe] = {
    # TF-IDF-style words + bigrams + char n-grams, linear SVM; header fields tagged.
    "ngram_bag": Recipe(preprocessing={"max_tokens": 4096, "header_fields": list(HEADER_FIELDS)},
                        extra={"min_freq": 1, "max_vocab": 250_000, "ngram": {"weight_dtype": "float16"},
                               "calibrate_score_power": True}),
    "bilstm": Recipe(loop={"epochs": 8, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01, "label_smoothing": 0.1,
                           "warmup_fraction": 0.05, "schedule": "cosine", "grad_clip": 1.0},
                     batch_size=64, model={"max_tokens": 256}, preprocessing={"max_tokens": 256},
                     extra={"min_freq": 2, "max_vocab": 50_000}),
    "trunk": Recipe(loop={"epochs": 8, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.1,
                          "warmup_fraction": 0.1, "schedule": "cosine", "grad_clip": 1.0},
                    batch_size=64, preprocessing={"max_tokens": 128}, extra={"min_freq": 2, "max_vocab": 30_000}),
}
DEFAULT_BATCH_SIZE = 64  # a text recipe without its own batch size
FREEZE_MODES = ("none", "trunk-except-norms", "trunk")
# Learning rates of a trunk text model by what is frozen: the transfer study's best values
# (runs/transfer-study): a frozen trunk lets the adapter and head take a much larger step.
TRUNK_LR_BY_FREEZE = {"none": 3e-3, "trunk-except-norms": 1e-1, "trunk": 1e-1}


@dataclasses.dataclass(kw_only=True)
class TextRunOptions(RunOptions):
    architecture: str = "ngram_bag"
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the recipe's
    ngram: dict[str, Any] = dataclasses.field(default_factory=dict)
    min_freq: int | None = None
    max_vocab: int | None = None
    split_seed: int = 0
    parent: Path | None = None  # image checkpoint whose trunk initialises a trunk text model
    freeze: str = "none"
    label_fraction: float = 1.0
    class_weights: str = "auto"  # auto | balanced | none


@dataclasses.dataclass
class PreparedText:
    """Everything a run needs before the model: split, tokens, vocabulary, token ids."""

    data: TextDataset
    preprocessing: TextPreprocessing
    vocabulary: Vocabulary
    train_ids: list[list[int]]
    train_labels: torch.Tensor
    val_ids: list[list[int]]
    val_labels: torch.Tensor
    train_index: torch.Tensor  # positions in ``data`` of the training and validation posts
    val_index: torch.Tensor


def text_inputs(model: nn.Module, token_ids: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Positional inputs for ``model(*inputs)``: a trunk model takes ``(images, token_ids)``."""
    return (None, token_ids) if isinstance(model, TrunkClassifier) else (token_ids,)


class TextBatches:
    """Shuffled batches of token-id lists, padded to the longest post of each batch."""

    def __init__(self, model: nn.Module, ids: list[list[int]], labels: torch.Tensor, batch_size: int, seed: int,
                 max_tokens: int) -> None:
        self.model, self.ids, self.labels, self.seed, self.max_tokens = model, ids, labels, seed, max_tokens
        self.batch_size = min(batch_size, len(ids))

    def steps_per_epoch(self) -> int:
        return max(1, len(self.ids) // self.batch_size)

    def batch(self, epoch: int, step: int, rank: int, world_size: int) -> Batch:
        order = torch.randperm(len(self.ids), generator=seeded_generator(self.seed, epoch))
        indices = order[step * self.batch_size:(step + 1) * self.batch_size][rank::world_size].tolist()
        return text_inputs(self.model, pad_batch([self.ids[i] for i in indices], self.max_tokens)), self.labels[indices]


def evaluation_batches(model: nn.Module, ids: list[list[int]], labels: torch.Tensor, max_tokens: int,
                       batch_size: int = 256) -> Iterator[Batch]:
    """In-order batches of ``model``'s inputs, padded per batch."""
    for start in range(0, len(ids), batch_size):
        token_ids = pad_batch(ids[start:start + batch_size], max_tokens)  # (B, T)
        yield text_inputs(model, token_ids), labels[start:start + batch_size]


def recipe_for(architecture: str) -> Recipe:
    if architecture not in TEXT_RECIPES:
        raise ValueError(f"no text recipe for {architecture!r}; choose from {sorted(TEXT_RECIPES)}")
    return TEXT_RECIPES[architecture]


def text_recipe(options: TextRunOptions) -> Recipe:
    """The architecture's recipe ← the command line's loop, batch size, config, preprocessing and vocabulary."""
    vocabulary = {"min_freq": options.min_freq, "max_vocab": options.max_vocab}
    overrides = Recipe(loop=options.loop, batch_size=options.batch_size, model=options.model_config,
                       preprocessing=options.preprocessing, extra={k: v for k, v in vocabulary.items() if v})
    return merge_recipes(recipe_for(options.architecture), overrides)


def prepare_text_run(options: TextRunOptions, data: TextDataset | None = None) -> PreparedText:
    recipe = text_recipe(options)
    data = data or load_text_data(options.data)
    train_idx, val_idx = stratified_split(data.labels, options.validation_fraction, options.split_seed)
    if options.label_fraction < 1.0:
        train_idx = train_idx[label_budget(data.labels[train_idx], options.label_fraction, options.seed)]
    if options.limit:
        train_idx = train_idx[torch.randperm(len(train_idx), generator=seeded_generator(options.seed))[:options.limit]]
        train_idx = train_idx.sort().values
    preprocessing = TextPreprocessing.from_dict(dict(recipe.preprocessing))
    return prepare_split(options, data, preprocessing, train_idx, val_idx)


def prepare_split(options: TextRunOptions, data: TextDataset, preprocessing: TextPreprocessing,
                  train_idx: torch.Tensor, val_idx: torch.Tensor, tokens: list[list[str]] | None = None) -> PreparedText:
    """Token ids of a (train, validation) split, with a vocabulary built from its training posts only.

    ``tokens``: every post's tokens when the caller already has them (else read from the cache).
    """
    limits = text_recipe(options).extra
    tokens = tokens if tokens is not None else cached_tokens(data, preprocessing)
    train_tokens = [tokens[i] for i in train_idx.tolist()]
    vocabulary = Vocabulary.build(train_tokens, limits["min_freq"], limits["max_vocab"])
    return PreparedText(
        data, preprocessing, vocabulary,
        [vocabulary.lookup(t) for t in train_tokens], data.labels[train_idx],
        [vocabulary.lookup(tokens[i]) for i in val_idx.tolist()], data.labels[val_idx], train_idx, val_idx,
    )


def cross_fitted_logits(options: TextRunOptions, prepared: PreparedText, folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold logits for every post: each is scored by the recipe fitted on the other folds.

    Calibrating on these (11k posts for 20 Newsgroups) instead of one 10% split (1.1k) makes the
    temperature and the ECE estimate far less noisy; the shipped model is then refit on every post,
    as scikit-learn's ``CalibratedClassifierCV(ensemble=False)`` does.
    """
    data = prepared.data
    tokens = cached_tokens(data, prepared.preprocessing)  # once, not once per fold

    def score(fold: int, train_idx: torch.Tensor, val_idx: torch.Tensor) -> torch.Tensor:
        fold_prepared = prepare_split(options, data, prepared.preprocessing, train_idx, val_idx, tokens)
        model, _, _ = train_text_model(options, fold_prepared)
        logits = validation_logits(model, fold_prepared, options.device)
        accuracy = float((logits.argmax(dim=1) == data.labels[val_idx]).float().mean())
        logger.info("fold %d/%d: %d held-out posts, accuracy %.4f", fold + 1, folds, len(val_idx), accuracy)
        return logits

    return out_of_fold_logits(data.labels, len(data.classes), folds, options.split_seed, score), data.labels


def prepare_full_refit(options: TextRunOptions, prepared: PreparedText) -> PreparedText:
    """Every post (training and validation) as training data; vocabulary rebuilt over all of them."""
    limits = text_recipe(options).extra
    tokens = cached_tokens(prepared.data, prepared.preprocessing)
    vocabulary = Vocabulary.build(tokens, limits["min_freq"], limits["max_vocab"])
    everything = torch.arange(len(prepared.data))
    return dataclasses.replace(prepared, vocabulary=vocabulary, train_ids=[vocabulary.lookup(t) for t in tokens],
                               train_labels=prepared.data.labels, train_index=everything)


def check_transfer_source(manifest: Manifest, checkpoint: Path) -> None:
    if manifest.architecture != "trunk":
        raise TrunkTransferError(f"{checkpoint} is a {manifest.architecture!r} checkpoint with no shared trunk; "
                                 "pretrain an image model with --arch trunk to transfer it to text")


def text_trunk_from_image(checkpoint: Path, vocab_size: int, num_classes: int, max_tokens: int,
                          overrides: dict[str, Any] | None = None) -> TrunkClassifier:
    """A text ``trunk`` model whose shared trunk is the image checkpoint's; adapter and head fresh."""
    state, manifest = load_state_dict(checkpoint)
    check_transfer_source(manifest, checkpoint)
    config = {**manifest.config, **(overrides or {}), "modalities": ["text"], "vocab_size": vocab_size,
              "num_classes": num_classes, "max_text_tokens": max_tokens, "tta_flip": False}  # an image-only view
    model = build_model("trunk", config)
    assert isinstance(model, TrunkClassifier)
    copy_trunk(model, state, str(checkpoint))
    return model


def apply_freeze(model: nn.Module, mode: str) -> int:
    """Freeze shared-trunk parameters (``trunk``: all, ``trunk-except-norms``: all but LayerNorms)."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"--freeze must be one of {FREEZE_MODES}, got {mode!r}")
    frozen = 0
    for name, parameter in model.named_parameters():
        is_norm = ".norm" in name or name.endswith(("norm.weight", "norm.bias"))
        if mode != "none" and name.startswith("trunk.") and not (mode == "trunk-except-norms" and is_norm):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def ngram_options(options: TextRunOptions, prepared: PreparedText) -> NgramOptions:
    """The recipe's n-gram fit with the command line's, balanced when the classes ask for it."""
    weights = resolve_class_weights(options.class_weights, prepared.train_labels, len(prepared.data.classes))
    return NgramOptions(**{**text_recipe(options).extra.get("ngram", {}), **options.ngram,
                           **({"class_weight": "balanced"} if weights is not None else {})})


def build_text_model(options: TextRunOptions, prepared: PreparedText) -> nn.Module:
    """The untrained model of ``options`` for ``prepared`` (an n-gram bag's tables come from its training posts)."""
    classes, vocab_size = len(prepared.data.classes), len(prepared.vocabulary)
    max_tokens = prepared.preprocessing.max_tokens
    if options.architecture == "ngram_bag":
        header_prefixes = tuple(f"{f}:" for f in prepared.preprocessing.header_fields)
        return build_ngram_model(prepared.train_ids, prepared.vocabulary.itos, classes, ngram_options(options, prepared),
                                 max_tokens, header_prefixes)
    if options.parent is not None:
        if options.architecture != "trunk":
            raise ValueError("--from (image transfer) needs the trunk architecture")
        return text_trunk_from_image(options.parent, vocab_size, classes, max_tokens, options.model_config)
    config = {**text_recipe(options).model, "vocab_size": vocab_size, "num_classes": classes}
    if options.architecture == "trunk":
        config.update(modalities=["text"], max_text_tokens=max_tokens)
    return build_model(options.architecture, config)


def train_text_model(options: TextRunOptions, prepared: PreparedText, state_dir: Path | None = None,
                     validate_each_epoch: bool = True, model: nn.Module | None = None,
                     ) -> tuple[nn.Module, list[dict[str, float]], dict[str, Any]]:
    """Train (or fit) ``model`` (default: a new one of ``options``) on ``prepared``; returns model, history, details."""
    device = pick_device(options.device)
    recipe = text_recipe(options)
    started = time.perf_counter()
    if model is None:
        model = build_text_model(options, prepared)
    if options.architecture == "ngram_bag":
        assert isinstance(model, NgramBagClassifier)
        ngram = ngram_options(options, prepared)
        fit_details = fit_ngram_model(model, prepared.train_ids, prepared.train_labels, ngram, options.seed)
        details = {"ngram": dataclasses.asdict(ngram), **fit_details, "train_seconds": time.perf_counter() - started}
        return model, [], details
    frozen = apply_freeze(model, options.freeze)
    lr = {}
    if options.architecture == "trunk" and options.parent is not None and "lr" not in options.loop:
        lr = {"lr": TRUNK_LR_BY_FREEZE[options.freeze]}
    batch_size = int(options.batch_size or adapt_batch_size(recipe.batch_size or DEFAULT_BATCH_SIZE,
                                                            len(prepared.train_ids)))
    class_weights = resolve_class_weights(options.class_weights, prepared.train_labels, len(prepared.data.classes))
    loop = recipe.loop_config(options.seed, class_weights=class_weights, **lr)
    source = TextBatches(model, prepared.train_ids, prepared.train_labels, batch_size, options.seed,
                         prepared.preprocessing.max_tokens)
    if options.batch_size is None and "epochs" not in options.loop:  # the study fixes both; a user's small set adapts
        loop = dataclasses.replace(loop, epochs=adapt_epochs(loop.epochs, source.steps_per_epoch()))

    def validate(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_logits(m, evaluation_batches(m, prepared.val_ids, prepared.val_labels,
                                                    prepared.preprocessing.max_tokens), device, loop.precision)

    history = fit(model, source, loop, device=device, validate=validate if validate_each_epoch else None,
                  state_dir=state_dir,
                  stop_after_steps=options.stop_after_steps, description=options.architecture)
    details = {"loop": dataclasses.asdict(loop), "batch_size": batch_size, "frozen_parameters": frozen,
               "freeze": options.freeze, "train_seconds": time.perf_counter() - started, "device": str(device)}
    return model, history, details


def validation_logits(model: nn.Module, prepared: PreparedText, device: str = "auto") -> torch.Tensor:
    torch_device = pick_device(device)
    logits, _ = predict_logits(model.to(torch_device), evaluation_batches(
        model, prepared.val_ids, prepared.val_labels, prepared.preprocessing.max_tokens), torch_device)
    return logits


def run_text_training(options: TextRunOptions) -> dict[str, Any]:
    """Prepare, train, calibrate on held-out posts and write the checkpoint (with ``vocab.json``)."""
    from training.text.trainer import TextTrainer

    return run_trainer(TextTrainer(), options)
