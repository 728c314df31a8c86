"""Helpers every training command shares: devices, code version, lineage, writing the results."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.calibration import Calibration
from models.checkpoint import Manifest, read_manifest, save_checkpoint, sha256_file
from training.engine.calibration import calibrate
from training.engine.metrics import classification_metrics, plot_confusion_matrix, plot_training_curves

logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed() -> None:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    return "python -m training " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def lineage(parent: Path | None) -> dict[str, Any] | None:
    if parent is None:
        return None
    manifest = read_manifest(parent)
    return {"name": manifest.name, "version": manifest.version, "weights_sha256": manifest.weights_sha256,
            "architecture": manifest.architecture, "path": str(parent)}


def finish_checkpoint(
    output: Path,
    model: nn.Module,
    manifest: Manifest,
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    history: list[dict[str, float]],
    extra_files: dict[str, bytes] | None = None,
    extra_metrics: dict[str, Any] | None = None,
    top_label: bool = False,
) -> dict[str, Any]:
    """Calibrate on the validation logits (``top_label``: try a top-label map too, see
    ``training.engine.calibration.calibrate``), record metrics, write the checkpoint and its plots."""
    calibration = calibrate(val_logits, val_labels, top_label=top_label)
    metrics = classification_metrics(val_logits, val_labels, manifest.classes, Calibration.from_manifest(calibration))
    metrics.update(extra_metrics or {})
    metrics["history"] = history
    manifest = dataclasses.replace(
        manifest,
        calibration=calibration,
        metrics={"validation": metrics},
        code_version=manifest.code_version or code_version(),
        training_command=manifest.training_command or command_line(),
    )
    save_checkpoint(output, model.cpu(), manifest, extra_files)
    plot_confusion_matrix(metrics["confusion_matrix"], manifest.classes, output.parent / f"{output.name}.confusion.png",
                          f"{manifest.name}: validation confusion (acc {metrics['accuracy']:.3f})")
    if history:
        plot_training_curves(history, output.parent / f"{output.name}.curves.png", f"{manifest.name} training")
    summary = {
        "checkpoint": str(output), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
        "nll": metrics["nll"], "ece_before": calibration["ece_before"], "ece_after": calibration["ece_after"],
        "temperature": calibration["temperature"], "weights_sha256": sha256_file(output / "model.safetensors"),
    }
    logger.info("wrote %s: %s", output, json.dumps(summary))
    return summary
