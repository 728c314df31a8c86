"""``evaluate``: score any checkpoint on a labelled data set of its task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.checkpoint import load_checkpoint
from models.preprocessing import ImagePreprocessing
from training.common import pick_device
from training.image_data import load_image_folder
from training.image_task import evaluation_batches
from training.loop import predict_logits
from training.metrics import classification_metrics


def evaluate_checkpoint(checkpoint: Path, data: Path, batch_size: int = 500, device: str = "auto") -> dict[str, Any]:
    loaded = load_checkpoint(checkpoint)
    manifest = loaded.manifest
    torch_device = pick_device(device)
    if manifest.task == "image":
        preprocessing = ImagePreprocessing.from_manifest(manifest)
        dataset = load_image_folder(data, size=preprocessing.size)
        if dataset.classes != manifest.classes:
            raise ValueError(f"{data} has classes {dataset.classes}, the checkpoint {manifest.classes}")
        batches = evaluation_batches(dataset, preprocessing, batch_size)
        logits, labels = predict_logits(loaded.model.to(torch_device), batches, torch_device)
    else:
        from training.text_evaluate import text_logits  # type: ignore[import-not-found]

        logits, labels = text_logits(loaded, data, batch_size, torch_device)
    metrics = classification_metrics(logits, labels, manifest.classes, manifest.temperature)
    metrics["checkpoint"] = str(checkpoint)
    return metrics
