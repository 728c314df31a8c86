"""What every fusion run shares: its options, the recipes, and the preparation of data and parents.

``prepare`` loads (or reuses) the pairs and the parent checkpoints, splits them (20% validation,
stratified, split seed fixed so every run and study arm is scored on the same pairs), tokenises the
texts under the fusion preprocessing and builds the fusion vocabulary. The presence masks, modality
dropout and loss weighting used by both fusion architectures live here too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.preprocessing import ImagePreprocessing
from models.text_encoding import TextPreprocessing, Vocabulary, tokenize
from training.engine.adaptive import class_weights, stratified_folds
from training.engine.loop import LoopConfig, seeded_generator
from training.engine.metrics import classification_metrics
from training.engine.options import RunOptions
from training.engine.recipe import Recipe, merge_recipes
from training.fusion.data import PairDataset, load_pairs
from training.fusion.sentence import SentenceSource, load_sentence_source
from training.fusion.stacking import ScorerOptions
from training.fusion.text import BagOptions, build_vocabulary, tweet_preprocessing
from training.fusion.transfer import Parent, TextParent, load_image_parent, load_text_parent
from training.image.data import stratified_split

logger = logging.getLogger(__name__)

SPLIT_SEED = 0  # every run and every study arm shares one validation split
ARCHITECTURES = {"late": "fusion_late", "joint": "fusion_joint"}
MODALITIES = ("image", "text")
JOINT_TEXT_TOKENS = 40  # tweets are ~20 tokens; attention and padding cost grow with the longest in a batch
LATE_IMAGE_SIZE = 32  # the CIFAR filters' scale; features of 64×64 photos measured no better
SENTENCE_C = 0.3  # the sentence scorer's L2: +0.5 points and +0.006 macro-F1 over C = 1 on five validation splits


DEFAULT_BATCH_SIZE = 64  # the recipes' batch, shrunk for small data (training.engine.adaptive)


@dataclasses.dataclass(kw_only=True)
class FusionOptions(RunOptions):
    image_from: Path | None = None
    text_from: Path | None = None
    arch: str = "late"
    modalities: tuple[str, ...] = MODALITIES  # train and evaluate with only these (study arms)
    image_size: int | None = None  # default: late LATE_IMAGE_SIZE, joint the trunk's size
    validation_fraction: float = 0.2
    split_seed: int = SPLIT_SEED  # which stratified validation split (benchmarks try others)
    batch_size: int | None = DEFAULT_BATCH_SIZE  # None: adapted to the data (finetune-fusion's default)
    modality_dropout: float = 0.3
    lexicon: bool = True  # late: the text side adds sentiment-lexicon features for the head
    # late: a pretrained sentence encoder (a sentence-transformers folder, or "minilm") whose frozen
    # embedding gets its own scorer on the text side; None for none
    sentence_from: str | None = None
    # loss weights of the trained part: none | sqrt (inverse square-root frequency) | balanced; None: the
    # recipe's (late: none — its scorers are already fitted with balanced weights; joint: sqrt)
    class_weighting: str | None = None
    bag: BagOptions = dataclasses.field(default_factory=BagOptions)
    text_scorer: ScorerOptions = dataclasses.field(default_factory=lambda: ScorerOptions(C=1.0))
    image_scorer: ScorerOptions = dataclasses.field(default_factory=lambda: ScorerOptions(C=0.01))
    sentence_scorer: ScorerOptions = dataclasses.field(default_factory=lambda: ScorerOptions(C=SENTENCE_C))
    # ``refit_full`` (late): after validating and calibrating on the split, fit everything again on every pair
    # (the split's validation pairs join the training rows; they stay in ``val_idx`` only for the code paths
    # that need rows). ``calibration_folds`` (late): K-fold out-of-fold predictions of every pair, then a refit.
    fold: int | None = None  # with calibration_folds K: this fold is the validation set (internal)


# ``extra["class_weighting"]``: the loss weighting of the trained part (``FusionOptions.class_weighting``).
RECIPES: dict[str, Recipe] = {
    "late": Recipe(loop={"epochs": 30, "lr": 3e-3, "weight_decay": 0.02, "optimizer": "adamw", "schedule": "cosine",
                         "warmup_fraction": 0.05},
                   batch_size=DEFAULT_BATCH_SIZE, extra={"class_weighting": "none"}),
    "joint": Recipe(loop={"epochs": 6, "lr": 5e-4, "weight_decay": 0.05, "optimizer": "adamw", "schedule": "cosine",
                          "warmup_fraction": 0.1},
                    batch_size=DEFAULT_BATCH_SIZE, extra={"class_weighting": "sqrt"}),
}


@dataclasses.dataclass
class Prepared:
    """Everything a run derives from the data and the parents before training."""

    data: PairDataset
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    token_lists: list[list[str]]
    preprocessing: TextPreprocessing
    vocabulary: Vocabulary
    ids: list[list[int]]
    image_parent: Parent | None
    text_parent: TextParent | None
    image: ImagePreprocessing  # the run's image size, with the image parent's standardisation or the data's
    sentence: SentenceSource | None = None
    sentence_ids: list[list[int]] | None = None  # every pair's WordPiece ids, with ``sentence``


def prepare(options: FusionOptions, image_parent: Parent | None = None, text_parent: TextParent | None = None,
            data: PairDataset | None = None, token_lists: list[list[str]] | None = None,
            sentence: SentenceSource | None = None) -> Prepared:
    """Load (or reuse) the data, parents and sentence encoder, split, tokenise, and build the fusion vocabulary."""
    if options.arch not in ARCHITECTURES:
        raise ValueError(f"unknown fusion architecture {options.arch!r}; choose from {sorted(ARCHITECTURES)}")
    if options.sentence_from is not None and options.arch != "late":
        raise ValueError("--sentence-from is for late fusion (the joint model reads texts through the trunk)")
    if sentence is None and options.sentence_from is not None:
        sentence = load_sentence_source(options.sentence_from)
    image_archs = ("fastconv",) if options.arch == "late" else ("trunk",)
    if image_parent is None and options.image_from is not None:
        image_parent = load_image_parent(options.image_from, image_archs)
    if text_parent is None and options.text_from is not None:
        text_parent = load_text_parent(options.text_from)
    if options.arch == "joint" and text_parent is not None and text_parent.manifest.architecture != "trunk":
        # nothing of an n-gram or LSTM model fits the trunk's text adapter, and its 150k-word vocabulary
        # would only make the adapter's dense embedding (and every optimizer step) 20× larger
        logger.warning("joint fusion takes a text adapter only from a 'trunk' text checkpoint; %s is %r, so the text "
                       "side starts from scratch", options.text_from, text_parent.manifest.architecture)
        text_parent = None
    trunk_size = int(image_parent.manifest.config.get("image_size", 32)) if image_parent is not None else 32
    image_size = options.image_size or (LATE_IMAGE_SIZE if options.arch == "late" else trunk_size)
    if data is None:
        data = load_pairs(options.data, image_size)
    elif tuple(data.images.shape[2:]) != (image_size, image_size):
        raise ValueError(f"the reused data has {tuple(data.images.shape[2:])} images, this run needs {image_size}")
    if options.fold is not None:
        fold_of = stratified_folds(data.labels, int(options.calibration_folds), options.split_seed)
        train_idx, val_idx = torch.nonzero(fold_of != options.fold).flatten(), torch.nonzero(fold_of == options.fold).flatten()
    else:
        train_idx, val_idx = stratified_split(data.labels, options.validation_fraction, options.split_seed)
    if options.limit:
        order = torch.randperm(len(train_idx), generator=seeded_generator(options.split_seed))
        train_idx = train_idx[order[: options.limit]].sort().values
    if options.refit_full:
        train_idx = torch.cat([train_idx, val_idx]).sort().values
    parent_pre = text_parent.encoder.preprocessing if text_parent is not None else None
    preprocessing = tweet_preprocessing(parent_pre, options.bag.max_tokens)
    if token_lists is None:
        token_lists = tokenize(data.texts, preprocessing)
    vocabulary = build_vocabulary([token_lists[i] for i in train_idx.tolist()],
                                  text_parent.encoder.vocabulary if text_parent is not None else None,
                                  options.bag.min_freq)
    ids = [vocabulary.lookup(tokens) for tokens in token_lists]
    if image_parent is not None:
        # the parent's standardisation at this run's size; resized as the pairs are decoded (bilinear)
        parent_image = ImagePreprocessing.from_manifest(image_parent.manifest)
        image = ImagePreprocessing(image_size, parent_image.mean, parent_image.std)
    else:
        with_image = train_idx[data.has_image[train_idx]]
        image = ImagePreprocessing.from_images(data.images[with_image], image_size)
    sentence_ids = None if sentence is None else [sentence.tokenizer.encode(text) for text in data.texts]
    return Prepared(data, train_idx, val_idx, token_lists, preprocessing, vocabulary, ids, image_parent, text_parent,
                    image, sentence, sentence_ids)


def presence(prep: Prepared, indices: torch.Tensor, modalities: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    image_mask = prep.data.has_image[indices] & ("image" in modalities)
    text_mask = prep.data.has_text[indices] & ("text" in modalities)
    return image_mask, text_mask


def drop_modalities(image_mask: torch.Tensor, text_mask: torch.Tensor, rate: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the image or the text of each pair with probability ``rate`` (each half the time), never both."""
    draw = torch.rand(len(image_mask), generator=generator)
    both = image_mask & text_mask
    drop_image = both & (draw < rate / 2)
    drop_text = both & (draw >= rate / 2) & (draw < rate)
    return image_mask & ~drop_image, text_mask & ~drop_text


def fusion_recipe(options: FusionOptions) -> Recipe:
    """The architecture's recipe ← the command line's loop settings and class weighting."""
    weighting = {"class_weighting": options.class_weighting} if options.class_weighting is not None else {}
    return merge_recipes(RECIPES[options.arch], Recipe(loop=options.loop, extra=weighting))


def loop_config(options: FusionOptions, labels: torch.Tensor, classes: int) -> LoopConfig:
    recipe = fusion_recipe(options)
    return recipe.loop_config(options.seed, precision="fp32", save_every_steps=10**9,
                              class_weights=class_weights(labels, classes, recipe.extra["class_weighting"]))


def metrics_by_modality(logits: dict[str, torch.Tensor], labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    return {name: {k: v for k, v in classification_metrics(value, labels, classes).items()
                   if k in ("accuracy", "macro_f1", "nll")} for name, value in logits.items()}
