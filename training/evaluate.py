"""``evaluate``: score any checkpoint on a labelled data set of its task."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from models.calibration import Calibration
from models.checkpoint import load_checkpoint
from models.preprocessing import ImagePreprocessing
from training.engine.common import pick_device
from training.engine.loop import predict_logits
from training.engine.metrics import classification_metrics
from training.image.data import load_image_folder
from training.image.task import evaluation_batches


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
        from training.text.evaluate import text_logits

        logits, labels = text_logits(loaded, data, batch_size, torch_device)
    metrics = classification_metrics(logits, labels, manifest.classes, Calibration.from_manifest(manifest.calibration))
    metrics["checkpoint"] = str(checkpoint)
    return metrics


def _evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    return evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, device=args.device)


def add_commands(commands: Any) -> None:
    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a labelled data set")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--batch-size", type=int, default=500)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    evaluate.set_defaults(handler=_evaluate_command)
