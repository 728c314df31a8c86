"""Scoring a text checkpoint on a labelled text set (what ``python -m training evaluate`` calls)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import LoadedCheckpoint
from models.text_encoding import load_text_encoder
from training.engine.loop import predict_logits
from training.text.data import cached_tokens, load_text_data
from training.text.task import evaluation_batches


def text_logits(loaded: LoadedCheckpoint, data_path: Path, batch_size: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``loaded`` over the posts at ``data_path`` (labels in the checkpoint's order).

    Posts go through the checkpoint's own encoder (its preprocessing and vocabulary), exactly as the
    service encodes a request.
    """
    manifest = loaded.manifest
    if manifest.task != "text":
        raise ValueError(f"{loaded.directory} is a {manifest.task} checkpoint, not a text one")
    data = load_text_data(data_path, classes=manifest.classes)
    encoder = load_text_encoder(loaded.directory, manifest)
    ids = encoder.ids(cached_tokens(data, encoder.preprocessing))
    batches = evaluation_batches(loaded.model, ids, data.labels, encoder.preprocessing.max_tokens, batch_size)
    return predict_logits(loaded.model.to(device), batches, device)
