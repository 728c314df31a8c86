"""Joint fusion training: the shared trunk end to end, image and text tokens in one sequence.

Photos are augmented (flip, small translation) and standardised; absent or dropped sides are
masked out of attention. Loss weighting and modality dropout as the options say.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from models.fusion import JointFusionClassifier, JointFusionConfig
from models.text_encoding import pad_batch
from training.engine.loop import Batch, fit, predict_logits, seeded_generator
from training.fusion.prep import (
    DEFAULT_BATCH_SIZE,
    JOINT_TEXT_TOKENS,
    FusionOptions,
    Prepared,
    drop_modalities,
    loop_config,
    presence,
)
from training.fusion.transfer import init_joint
from training.image.data import augment


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
        image_mask, text_mask = presence(self.prep, rows, self.modalities)
        image_mask, text_mask = drop_modalities(image_mask, text_mask, self.rate, seeded_generator(self.seed, epoch, step, 7))
        images = augment(self.prep.data.images[rows], seeded_generator(self.seed, epoch, step, 3))
        images = self.prep.image.normalize(images) * image_mask.view(-1, 1, 1, 1)
        ids = pad_batch([self.prep.ids[i] if bool(on) else [] for i, on in zip(rows.tolist(), text_mask, strict=True)],
                        self.max_tokens)
        return (images, ids, image_mask, text_mask), self.prep.data.labels[rows]


def joint_eval_batches(prep: Prepared, rows: torch.Tensor, modalities: Sequence[str], max_tokens: int,
                       batch_size: int = 256) -> Iterator[Batch]:
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        image_mask, text_mask = presence(prep, chunk, modalities)
        images = prep.image.normalize(prep.data.images[chunk]) * image_mask.view(-1, 1, 1, 1)
        ids = pad_batch([prep.ids[i] if bool(on) else [] for i, on in zip(chunk.tolist(), text_mask, strict=True)], max_tokens)
        if prep.sentence_ids is None:
            yield (images, ids, image_mask, text_mask), prep.data.labels[chunk]
        else:  # a late model with a sentence encoder reads WordPiece ids too
            present = zip(chunk.tolist(), text_mask, strict=True)
            pieces = pad_batch([prep.sentence_ids[i] if bool(on) else [] for i, on in present], 10**6)
            yield (images, ids, image_mask, text_mask, pieces), prep.data.labels[chunk]


def build_joint(prep: Prepared, seed: int) -> tuple[JointFusionClassifier, dict[str, list[str]]]:
    torch.manual_seed(seed)
    base: dict[str, Any] = {}
    if prep.image_parent is not None:
        known = {f.name for f in dataclasses.fields(JointFusionConfig)}
        base = {k: v for k, v in prep.image_parent.manifest.config.items() if k in known and k != "tta_flip"}
    base.update(num_classes=len(prep.data.classes), modalities=("image", "text"), vocab_size=len(prep.vocabulary),
                image_size=prep.image.size, max_text_tokens=min(prep.preprocessing.max_tokens, JOINT_TEXT_TOKENS))
    if isinstance(base.get("modalities"), list):
        base["modalities"] = tuple(base["modalities"])
    model = JointFusionClassifier(JointFusionConfig(**base))
    copied = init_joint(model, prep.image_parent, prep.text_parent)
    return model, {"joint": copied} if copied else {}


def train_joint(model: JointFusionClassifier, prep: Prepared, options: FusionOptions, seed: int,
                device: torch.device) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    config = loop_config(dataclasses.replace(options, seed=seed), prep.data.labels[prep.train_idx], len(prep.data.classes))
    max_tokens = model.config.max_text_tokens
    source = _JointBatches(prep, options.modalities, options.batch_size or DEFAULT_BATCH_SIZE, seed, options.modality_dropout,
                           max_tokens)

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
