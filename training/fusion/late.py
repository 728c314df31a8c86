"""Late fusion training: per-modality scorers with out-of-fold scores, then the fusion head.

1. Scorers. The image encoder is the pretrained fastconv body, frozen (CIFAR filters applied to
   the photos; features computed once), with a balanced logistic scorer on its standardised
   features. The text n-gram bag's tables come from the training texts and its linear layer is a
   balanced logistic fit on its features. Every training pair also gets *out-of-fold* scores from
   scorers fitted without it (``training.fusion.stacking``), so the head never learns from scores a
   scorer produced for pairs it memorised. The transferred text model is frozen (its topic
   log-probabilities join the text scores). With a pretrained sentence encoder
   (``training.fusion.sentence``), its frozen embeddings get a third balanced logistic scorer,
   whose (out-of-fold) scores join the text scores after the bag's.
2. Head, on the cached scores: cross-entropy (weighted as the options say), modality dropout (a
   training pair loses its image or its text with probability ``modality_dropout``, never both),
   AdamW, one thread (a model this small only waits on thread barriers).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from models.fusion import LateFusionClassifier, LateFusionConfig
from models.image_cnn import FastConvConfig
from models.text_encoding import pad_batch
from training.engine.loop import Batch, fit, predict_logits, seeded_generator
from training.fusion.lexicon import lexicon_tables, read_vader_lexicon
from training.fusion.prep import DEFAULT_BATCH_SIZE, FusionOptions, Prepared, drop_modalities, loop_config, presence
from training.fusion.sentence import sentence_embeddings
from training.fusion.stacking import fit_scorer, load_linear, out_of_fold_scores
from training.fusion.text import build_bag, feature_matrix
from training.fusion.transfer import init_late_image_encoder, init_late_topic

logger = logging.getLogger(__name__)


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
    sentence = dataclasses.asdict(prep.sentence.config) if prep.sentence is not None else {}
    model = LateFusionClassifier(LateFusionConfig(num_classes=classes, image=image_config,
                                                  text=dataclasses.asdict(bag.config), topic=topic,
                                                  lexicon=options.lexicon, sentence=sentence))
    model.text_bag.load_state_dict(bag.state_dict())
    if options.lexicon:
        valence, negator = lexicon_tables(prep.vocabulary.itos, read_vader_lexicon())
        model.valence.copy_(valence)
        model.negator.copy_(negator)
        logger.info("sentiment lexicon: %d of %d vocabulary tokens carry a valence", int((valence != 0).sum()), len(valence))
    copied: dict[str, list[str]] = {}
    if prep.image_parent is not None:
        copied["image"] = init_late_image_encoder(model, prep.image_parent)
    else:
        model.image_encoder.init_whitening(prep.image.normalize(prep.data.images[image_rows[:2000]]))
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
    embeddings = None
    if prep.sentence is not None and prep.sentence_ids is not None and model.sentence_encoder is not None:
        # the frozen sentence encoder: its embeddings (computed once) get a balanced logistic scorer
        model.sentence_encoder.load_state_dict(prep.sentence.state)
        copied["sentence"] = sorted(prep.sentence.state)
        embeddings = sentence_embeddings(prep.sentence, prep.sentence_ids)
        weight, bias = fit_scorer(embeddings[text_rows].numpy(), prep.data.labels[text_rows], classes,
                                  options.sentence_scorer, seed)
        load_linear(model.sentence_scorer, weight, bias)
    text_scores = _text_scores(model, prep.ids, embeddings)
    text_scores[text_rows, :classes] = out_of_fold_scores(matrix, prep.data.labels[text_rows], classes, options.text_scorer, seed)
    if embeddings is not None:
        text_scores[text_rows, classes:2 * classes] = out_of_fold_scores(
            embeddings[text_rows].numpy(), prep.data.labels[text_rows], classes, options.sentence_scorer, seed)
    return LateEncoded(model, image_scores, text_scores, copied)


@torch.no_grad()
def _image_features(model: LateFusionClassifier, prep: Prepared, batch_size: int = 256) -> torch.Tensor:
    features = []
    for start in range(0, len(prep.data), batch_size):
        images = prep.image.normalize(prep.data.images[start:start + batch_size])
        features.append(model.image_features(images))
    return torch.cat(features)  # (N, width)


@torch.no_grad()
def _text_scores(model: LateFusionClassifier, ids: Sequence[Sequence[int]], embeddings: torch.Tensor | None,
                 batch_size: int = 512) -> torch.Tensor:
    max_tokens = model.text_bag.config.max_tokens
    return torch.cat([model.text_scores(pad_batch(ids[s:s + batch_size], max_tokens),
                                        sentence_embeddings=None if embeddings is None else embeddings[s:s + batch_size])
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
        image_mask, text_mask = presence(self.prep, rows, self.modalities)
        image_mask, text_mask = drop_modalities(image_mask, text_mask, self.rate, seeded_generator(self.seed, epoch, step, 7))
        inputs = (self.encoded.image_scores[rows], self.encoded.text_scores[rows], image_mask, text_mask)
        return inputs, self.prep.data.labels[rows]


def _head_eval_batches(encoded: LateEncoded, prep: Prepared, rows: torch.Tensor, modalities: Sequence[str]) -> Iterator[Batch]:
    image_mask, text_mask = presence(prep, rows, modalities)
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
    config = loop_config(dataclasses.replace(options, seed=seed), prep.data.labels[prep.train_idx], len(prep.data.classes))
    source = _HeadBatches(encoded, prep, options.modalities, options.batch_size or DEFAULT_BATCH_SIZE, seed,
                          options.modality_dropout)

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
