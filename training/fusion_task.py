"""Fine-tuning fusion models on paired data: from a pair manifest to a calibrated multimodal checkpoint.

Late fusion (the default) is trained in two stages, so neither side's memorised training set
misleads the fusion head:

1. Per-modality scorers. The image encoder is the pretrained fastconv body, frozen (CIFAR filters
   applied to the photos at ``image_size``; features computed once), with a balanced logistic
   scorer on its standardised features. The text n-gram bag's tables come from the training texts
   and its linear layer is a balanced logistic fit on its features. Every training pair also gets
   *out-of-fold* scores from scorers fitted without it (``training.fusion_stacking``). The
   transferred 20 Newsgroups model is frozen (its topic log-probabilities join the text scores).
2. Fusion head, on those scores: class-weighted cross-entropy, modality dropout (each training
   pair loses its image or its text with probability ``modality_dropout``, never both), AdamW.

Joint fusion trains the trunk end to end (image and text tokens in one sequence) with the same
class weights and modality dropout. Both are then temperature-calibrated on the validation split
(20%, stratified, split seed fixed) and written with a manifest naming both parents.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import new_manifest
from models.fusion import JointFusionClassifier, JointFusionConfig, LateFusionClassifier, LateFusionConfig
from models.image_cnn import FastConvConfig
from models.text_encoding import TextPreprocessing, Vocabulary, pad_batch, tokenize
from training.common import finish_checkpoint, pick_device
from training.fusion_data import PairDataset, load_pairs
from training.fusion_stacking import ScorerOptions, fit_scorer, load_linear, out_of_fold_scores
from training.fusion_text import BagOptions, build_bag, build_vocabulary, feature_matrix, tweet_preprocessing
from training.fusion_transfer import (
    Parent,
    TextParent,
    init_joint,
    init_late_image_encoder,
    init_late_topic,
    load_image_parent,
    load_text_parent,
)
from training.image_data import augment, channel_stats, normalize, stratified_split
from training.loop import Batch, LoopConfig, fit, predict_logits, seeded_generator
from training.metrics import classification_metrics

logger = logging.getLogger(__name__)

SPLIT_SEED = 0  # every run and every study arm shares one validation split
ARCHITECTURES = {"late": "fusion_late", "joint": "fusion_joint"}
MODALITIES = ("image", "text")
JOINT_TEXT_TOKENS = 40  # tweets are ~20 tokens; attention and padding cost grow with the longest in a batch
LATE_IMAGE_SIZE = 32  # the CIFAR filters' scale; features of 64×64 photos measured no better


@dataclasses.dataclass
class FusionOptions:
    data: Path
    output: Path | None = None
    image_from: Path | None = None
    text_from: Path | None = None
    arch: str = "late"
    modalities: tuple[str, ...] = MODALITIES  # train and evaluate with only these (study arms)
    image_size: int | None = None  # default: late LATE_IMAGE_SIZE, joint the trunk's size
    validation_fraction: float = 0.2
    seed: int = 0
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 64
    weight_decay: float | None = None
    modality_dropout: float = 0.3
    # loss weights of the trained part: none | sqrt (inverse square-root frequency) | balanced; None: the
    # recipe's (late: none — its scorers are already fitted with balanced weights; joint: sqrt)
    class_weighting: str | None = None
    bag: BagOptions = dataclasses.field(default_factory=BagOptions)
    text_scorer: ScorerOptions = dataclasses.field(default_factory=lambda: ScorerOptions(C=1.0))
    image_scorer: ScorerOptions = dataclasses.field(default_factory=lambda: ScorerOptions(C=0.01))
    device: str = "auto"
    name: str | None = None
    limit: int | None = None
    command: str = ""


RECIPES: dict[str, dict[str, Any]] = {
    "late": {"epochs": 30, "lr": 3e-3, "weight_decay": 0.02, "optimizer": "adamw", "schedule": "cosine",
             "warmup_fraction": 0.05, "class_weighting": "none"},
    "joint": {"epochs": 6, "lr": 5e-4, "weight_decay": 0.05, "optimizer": "adamw", "schedule": "cosine",
              "warmup_fraction": 0.1, "class_weighting": "sqrt"},
}


# ---- shared preparation ---------------------------------------------------------------------------

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
    mean: list[float]
    std: list[float]
    image_size: int


def class_weights(labels: torch.Tensor, classes: int, rule: str) -> list[float] | None:
    counts = torch.bincount(labels, minlength=classes).float().clamp(min=1)
    if rule == "none":
        return None
    if rule not in ("sqrt", "balanced"):
        raise ValueError(f"unknown class weighting {rule!r} (none, sqrt or balanced)")
    weights = (counts.sum() / counts) ** (0.5 if rule == "sqrt" else 1.0)
    return (weights / (weights * counts).sum() * counts.sum()).tolist()  # mean weight over examples = 1


def prepare(options: FusionOptions, image_parent: Parent | None = None, text_parent: TextParent | None = None,
            data: PairDataset | None = None, token_lists: list[list[str]] | None = None) -> Prepared:
    """Load (or reuse) the data and parents, split, tokenise, and build the fusion vocabulary."""
    if options.arch not in ARCHITECTURES:
        raise ValueError(f"unknown fusion architecture {options.arch!r}; choose from {sorted(ARCHITECTURES)}")
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
    train_idx, val_idx = stratified_split(data.labels, options.validation_fraction, SPLIT_SEED)
    if options.limit:
        order = torch.randperm(len(train_idx), generator=seeded_generator(SPLIT_SEED))
        train_idx = train_idx[order[: options.limit]].sort().values
    parent_pre = text_parent.encoder.preprocessing if text_parent is not None else None
    preprocessing = tweet_preprocessing(parent_pre, options.bag.max_tokens)
    if token_lists is None:
        token_lists = tokenize(data.texts, preprocessing)
    vocabulary = build_vocabulary([token_lists[i] for i in train_idx.tolist()],
                                  text_parent.encoder.vocabulary if text_parent is not None else None,
                                  options.bag.min_freq)
    ids = [vocabulary.lookup(tokens) for tokens in token_lists]
    if image_parent is not None:
        mean, std = list(image_parent.manifest.preprocessing["mean"]), list(image_parent.manifest.preprocessing["std"])
    else:
        with_image = train_idx[data.has_image[train_idx]]
        mean, std = channel_stats(data.images[with_image])
    return Prepared(data, train_idx, val_idx, token_lists, preprocessing, vocabulary, ids, image_parent, text_parent,
                    mean, std, image_size)


def _presence(prep: Prepared, indices: torch.Tensor, modalities: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    image_mask = prep.data.has_image[indices] & ("image" in modalities)
    text_mask = prep.data.has_text[indices] & ("text" in modalities)
    return image_mask, text_mask


def _drop_modalities(image_mask: torch.Tensor, text_mask: torch.Tensor, rate: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the image or the text of each pair with probability ``rate`` (each half the time), never both."""
    draw = torch.rand(len(image_mask), generator=generator)
    both = image_mask & text_mask
    drop_image = both & (draw < rate / 2)
    drop_text = both & (draw >= rate / 2) & (draw < rate)
    return image_mask & ~drop_image, text_mask & ~drop_text


def _loop_config(options: FusionOptions, labels: torch.Tensor, classes: int) -> LoopConfig:
    recipe = dict(RECIPES[options.arch])
    for key in ("epochs", "lr", "weight_decay", "class_weighting"):
        if getattr(options, key) is not None:
            recipe[key] = getattr(options, key)
    weighting = recipe.pop("class_weighting")
    return LoopConfig(seed=options.seed, precision="fp32", save_every_steps=10**9,
                      class_weights=class_weights(labels, classes, weighting), **recipe)


def _metrics_by_modality(logits: dict[str, torch.Tensor], labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    return {name: {k: v for k, v in classification_metrics(value, labels, classes).items()
                   if k in ("accuracy", "macro_f1", "nll")} for name, value in logits.items()}


# ---- late fusion ------------------------------------------------------------------------------------

@dataclasses.dataclass
class LateEncoded:
    """A late fusion model with fitted scorers, and the cached scores its head trains on."""

    model: LateFusionClassifier
    image_scores: torch.Tensor  # (N, classes): out-of-fold on train rows, the fitted scorer's elsewhere
    text_scores: torch.Tensor  # (N, text_width): likewise for the bag's columns; topic log-probabilities after
    copied: dict[str, list[str]]


def _has_topic(prep: Prepared) -> bool:
    return prep.text_parent is not None and prep.text_parent.manifest.architecture == "ngram_bag"


def build_late(prep: Prepared, options: FusionOptions, seed: int) -> LateEncoded:
    """Stage 1: the late model with its encoders initialised and both scorers fitted (plus out-of-fold scores)."""
    torch.manual_seed(seed)
    classes = len(prep.data.classes)
    text_rows = prep.train_idx[prep.data.has_text[prep.train_idx]]
    image_rows = prep.train_idx[prep.data.has_image[prep.train_idx]]
    text_ids = [prep.ids[i] for i in text_rows.tolist()]
    bag = build_bag(text_ids, prep.vocabulary, classes, options.bag)
    known = {f.name for f in dataclasses.fields(FastConvConfig)}
    image_config = {k: v for k, v in (prep.image_parent.manifest.config if prep.image_parent else {}).items() if k in known}
    topic = dict(prep.text_parent.manifest.config) if _has_topic(prep) and prep.text_parent is not None else {}
    model = LateFusionClassifier(LateFusionConfig(num_classes=classes, image=image_config,
                                                  text=dataclasses.asdict(bag.config), topic=topic))
    model.text_bag.load_state_dict(bag.state_dict())
    copied: dict[str, list[str]] = {}
    if prep.image_parent is not None:
        copied["image"] = init_late_image_encoder(model, prep.image_parent)
    else:
        model.image_encoder.init_whitening(normalize(prep.data.images[image_rows[:2000]], prep.mean, prep.std))
    if prep.text_parent is not None and topic:
        copied["text"] = init_late_topic(model, prep.text_parent)
    model.eval()
    # image side: frozen features, standardised with training statistics, balanced logistic scorer
    features = _image_features(model, prep)  # (N, width)
    with torch.no_grad():
        model.image_mean.copy_(features[image_rows].mean(dim=0))
        model.image_std.copy_(features[image_rows].std(dim=0).clamp(min=1e-4))
    standardised = ((features - model.image_mean) / model.image_std).numpy()
    weight, bias = fit_scorer(standardised[image_rows.numpy()], prep.data.labels[image_rows], classes, options.image_scorer, seed)
    load_linear(model.image_scorer, weight, bias)
    with torch.no_grad():
        image_scores = model.image_scores(features)
    image_scores[image_rows] = out_of_fold_scores(standardised[image_rows.numpy()], prep.data.labels[image_rows], classes,
                                                  options.image_scorer, seed)
    # text side: the bag's linear layer fitted on its own features
    matrix = feature_matrix(model.text_bag, text_ids)
    weight, bias = fit_scorer(matrix, prep.data.labels[text_rows], classes, options.text_scorer, seed)
    load_linear(model.text_bag, weight, bias, transpose=True)
    text_scores = _text_scores(model, prep.ids)
    text_scores[text_rows, :classes] = out_of_fold_scores(matrix, prep.data.labels[text_rows], classes, options.text_scorer, seed)
    return LateEncoded(model, image_scores, text_scores, copied)


@torch.no_grad()
def _image_features(model: LateFusionClassifier, prep: Prepared, batch_size: int = 256) -> torch.Tensor:
    features = []
    for start in range(0, len(prep.data), batch_size):
        images = normalize(prep.data.images[start:start + batch_size], prep.mean, prep.std)
        features.append(model.image_features(images))
    return torch.cat(features)  # (N, width)


@torch.no_grad()
def _text_scores(model: LateFusionClassifier, ids: Sequence[Sequence[int]], batch_size: int = 512) -> torch.Tensor:
    max_tokens = model.text_bag.config.max_tokens
    return torch.cat([model.text_scores(pad_batch(ids[s:s + batch_size], max_tokens))
                      for s in range(0, len(ids), batch_size)])  # (N, text_width)


class _FusionHead(nn.Module):
    """The late model seen through its head: cached features in, logits out (encoders untouched)."""

    def __init__(self, model: LateFusionClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_scores: torch.Tensor, text_scores: torch.Tensor, image_mask: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        return self.model.fuse(image_scores, text_scores, image_mask, text_mask)


class _HeadBatches:
    def __init__(self, encoded: LateEncoded, prep: Prepared, modalities: Sequence[str], batch_size: int,
                 seed: int, modality_dropout: float) -> None:
        self.encoded, self.prep, self.indices = encoded, prep, prep.train_idx
        self.modalities, self.batch_size, self.seed, self.rate = tuple(modalities), batch_size, seed, modality_dropout

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.indices) / self.batch_size))

    def batch(self, epoch: int, step: int, rank: int, world_size: int) -> Batch:
        order = torch.randperm(len(self.indices), generator=seeded_generator(self.seed, epoch))
        rows = self.indices[order[step * self.batch_size:(step + 1) * self.batch_size]]
        image_mask, text_mask = _presence(self.prep, rows, self.modalities)
        image_mask, text_mask = _drop_modalities(image_mask, text_mask, self.rate, seeded_generator(self.seed, epoch, step, 7))
        inputs = (self.encoded.image_scores[rows], self.encoded.text_scores[rows], image_mask, text_mask)
        return inputs, self.prep.data.labels[rows]


def _head_eval_batches(encoded: LateEncoded, prep: Prepared, rows: torch.Tensor, modalities: Sequence[str]) -> Iterator[Batch]:
    image_mask, text_mask = _presence(prep, rows, modalities)
    yield (encoded.image_scores[rows], encoded.text_scores[rows], image_mask, text_mask), prep.data.labels[rows]


def train_late_head(encoded: LateEncoded, prep: Prepared, options: FusionOptions, seed: int,
                    device: torch.device) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Stage 2: fit the fusion head (fresh init from ``seed``); returns the history and validation logits."""
    model = encoded.model
    model.requires_grad_(False)
    model.linear.requires_grad_(True)
    model.mlp.requires_grad_(True)
    torch.manual_seed(seed)
    for module in (model.linear, model.mlp):
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    head = _FusionHead(model)
    config = _loop_config(dataclasses.replace(options, seed=seed), prep.data.labels[prep.train_idx], len(prep.data.classes))
    source = _HeadBatches(encoded, prep, options.modalities, options.batch_size, seed, options.modality_dropout)

    def validate(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_logits(m, _head_eval_batches(encoded, prep, prep.val_idx, options.modalities), device, "fp32")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a head this small only waits on thread barriers (10× slower on a busy machine)
    try:
        history = fit(head, source, config, device=device, validate=validate, description="fusion head")
    finally:
        torch.set_num_threads(threads)
    head.to("cpu")
    logits = {}
    for name, modalities in (("fused", options.modalities), ("image_only", ("image",)), ("text_only", ("text",))):
        if set(modalities) <= set(options.modalities):
            logits[name] = predict_logits(head, _head_eval_batches(encoded, prep, prep.val_idx, modalities),
                                          torch.device("cpu"), "fp32")[0]
    model.eval()
    return history, logits


# ---- joint fusion ----------------------------------------------------------------------------------

class _JointBatches:
    def __init__(self, prep: Prepared, modalities: Sequence[str], batch_size: int, seed: int, rate: float,
                 max_tokens: int) -> None:
        self.prep, self.modalities, self.batch_size, self.seed, self.rate = prep, tuple(modalities), batch_size, seed, rate
        self.max_tokens = max_tokens

    def steps_per_epoch(self) -> int:
        return max(1, len(self.prep.train_idx) // self.batch_size)

    def batch(self, epoch: int, step: int, rank: int, world_size: int) -> Batch:
        order = torch.randperm(len(self.prep.train_idx), generator=seeded_generator(self.seed, epoch))
        rows = self.prep.train_idx[order[step * self.batch_size:(step + 1) * self.batch_size]]
        image_mask, text_mask = _presence(self.prep, rows, self.modalities)
        image_mask, text_mask = _drop_modalities(image_mask, text_mask, self.rate, seeded_generator(self.seed, epoch, step, 7))
        images = augment(self.prep.data.images[rows], seeded_generator(self.seed, epoch, step, 3))
        images = normalize(images, self.prep.mean, self.prep.std) * image_mask.view(-1, 1, 1, 1)
        ids = pad_batch([self.prep.ids[i] if bool(on) else [] for i, on in zip(rows.tolist(), text_mask, strict=True)],
                        self.max_tokens)
        return (images, ids, image_mask, text_mask), self.prep.data.labels[rows]


def joint_eval_batches(prep: Prepared, rows: torch.Tensor, modalities: Sequence[str], max_tokens: int,
                       batch_size: int = 256) -> Iterator[Batch]:
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        image_mask, text_mask = _presence(prep, chunk, modalities)
        images = normalize(prep.data.images[chunk], prep.mean, prep.std) * image_mask.view(-1, 1, 1, 1)
        ids = pad_batch([prep.ids[i] if bool(on) else [] for i, on in zip(chunk.tolist(), text_mask, strict=True)], max_tokens)
        yield (images, ids, image_mask, text_mask), prep.data.labels[chunk]


def build_joint(prep: Prepared, seed: int) -> tuple[JointFusionClassifier, dict[str, list[str]]]:
    torch.manual_seed(seed)
    base: dict[str, Any] = {}
    if prep.image_parent is not None:
        known = {f.name for f in dataclasses.fields(JointFusionConfig)}
        base = {k: v for k, v in prep.image_parent.manifest.config.items() if k in known}
    base.update(num_classes=len(prep.data.classes), modalities=("image", "text"), vocab_size=len(prep.vocabulary),
                image_size=prep.image_size, max_text_tokens=min(prep.preprocessing.max_tokens, JOINT_TEXT_TOKENS))
    if isinstance(base.get("modalities"), list):
        base["modalities"] = tuple(base["modalities"])
    model = JointFusionClassifier(JointFusionConfig(**base))
    copied = init_joint(model, prep.image_parent, prep.text_parent)
    return model, {"joint": copied} if copied else {}


def train_joint(model: JointFusionClassifier, prep: Prepared, options: FusionOptions, seed: int,
                device: torch.device) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    config = _loop_config(dataclasses.replace(options, seed=seed), prep.data.labels[prep.train_idx], len(prep.data.classes))
    max_tokens = model.config.max_text_tokens
    source = _JointBatches(prep, options.modalities, options.batch_size, seed, options.modality_dropout, max_tokens)

    def validate(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_logits(m, joint_eval_batches(prep, prep.val_idx, options.modalities, max_tokens), device, "fp32")

    history = fit(model, source, config, device=device, validate=validate, description="joint fusion")
    logits = {}
    for name, modalities in (("fused", options.modalities), ("image_only", ("image",)), ("text_only", ("text",))):
        if set(modalities) <= set(options.modalities):
            logits[name] = predict_logits(model, joint_eval_batches(prep, prep.val_idx, modalities, max_tokens), device,
                                          "fp32")[0]
    model.to("cpu").eval()
    return history, logits


# ---- the command ------------------------------------------------------------------------------------

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
    return {
        "kind": "multimodal",
        "image": {"kind": "image", "size": prep.image_size, "mean": prep.mean, "std": prep.std, "color": "RGB",
                  "resize": "bilinear"},
        "text": prep.preprocessing.to_dict(),
        "inputs": "model(images, token_ids, image_mask, text_mask); see models.fusion.FUSION_INPUTS",
    }


def parents(prep: Prepared, copied: dict[str, list[str]]) -> dict[str, Any] | None:
    record: dict[str, Any] = {}
    if prep.image_parent is not None:
        record["image"] = {**prep.image_parent.lineage(), "copied_tensors": len(copied.get("image", copied.get("joint", [])))}
    if prep.text_parent is not None:
        record["text"] = {**prep.text_parent.lineage(), "copied_tensors": len(copied.get("text", [])),
                          "vocabulary": "extended"}
    return record or None


def run_fusion_training(options: FusionOptions) -> dict[str, Any]:
    """``finetune-fusion``: prepare, train, calibrate, write the checkpoint; returns a summary."""
    if options.output is None:
        raise ValueError("finetune-fusion needs --output")
    device = pick_device(options.device)
    prep = prepare(options)
    model: nn.Module
    if options.arch == "late":
        encoded = build_late(prep, options, options.seed)
        history, logits = train_late_head(encoded, prep, options, options.seed, torch.device("cpu"))
        model, copied = encoded.model, encoded.copied
        # the real forward (encoders included) must agree with the cached-feature head up to the text
        # scores of train rows, which were out-of-fold; validation rows used the fitted bag in both
        batches = joint_eval_batches(prep, prep.val_idx, options.modalities, 10**6)
        val_logits = predict_logits(model, batches, torch.device("cpu"), "fp32")[0]
        if not torch.allclose(val_logits, logits["fused"], atol=1e-3, rtol=1e-3):
            raise RuntimeError("internal error: the late model's forward disagrees with its cached features")
    else:
        joint, copied = build_joint(prep, options.seed)
        history, logits = train_joint(joint, prep, options, options.seed, device)
        model = joint
    val_labels = prep.data.labels[prep.val_idx]
    manifest = new_manifest(
        options.name or options.output.name, "multimodal", ARCHITECTURES[options.arch], model.config,  # type: ignore[arg-type]
        classes=prep.data.classes, preprocessing=preprocessing_dict(prep), data_fingerprint=prep.data.fingerprint,
        parent=parents(prep, copied), training_command=options.command,
    )
    extra = {
        "by_modality": _metrics_by_modality(logits, val_labels, prep.data.classes),
        "reference_tfidf_svm": tfidf_svm_reference(prep),
        "majority_accuracy": float(torch.bincount(val_labels).max() / len(val_labels)),
        "train_pairs": len(prep.train_idx), "validation_pairs": len(prep.val_idx), "split_seed": SPLIT_SEED,
        "modalities": list(options.modalities), "image_size": prep.image_size,
        "modality_dropout": options.modality_dropout,
        "class_weighting": options.class_weighting or RECIPES[options.arch]["class_weighting"],
        "bag": dataclasses.asdict(options.bag), "text_scorer": dataclasses.asdict(options.text_scorer),
        "image_scorer": dataclasses.asdict(options.image_scorer), "batch_size": options.batch_size,
    }
    summary = finish_checkpoint(options.output, model, manifest, logits["fused"], val_labels, history,
                                extra_files={prep.preprocessing.vocab_file: prep.vocabulary.to_json_bytes()},
                                extra_metrics=extra)
    summary["by_modality"] = extra["by_modality"]
    summary["reference_tfidf_svm"] = extra["reference_tfidf_svm"]
    return summary
