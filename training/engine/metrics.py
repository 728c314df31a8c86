"""Classification metrics and the plots that go beside a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.calibration import Calibration
from training.engine.calibration import expected_calibration_error


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, classes: list[str], calibration: Calibration | float = 1.0
) -> dict[str, Any]:
    """Accuracy, macro-F1, NLL, ECE (15 bins), per-class accuracy and the confusion matrix, of the
    calibrated distribution (a bare number is a temperature)."""
    if not isinstance(calibration, Calibration):
        calibration = Calibration(float(calibration))
    probabilities = calibration.probabilities(logits)
    predicted = probabilities.argmax(dim=1)
    count = len(classes)
    confusion = torch.bincount(labels * count + predicted, minlength=count * count).view(count, count)
    true_positive = confusion.diag().float()
    precision = true_positive / confusion.sum(dim=0).clamp(min=1)
    recall = true_positive / confusion.sum(dim=1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {
        "accuracy": float((predicted == labels).float().mean()),
        "macro_f1": float(f1.mean()),
        "nll": float(F.nll_loss(calibration.log_probabilities(logits), labels)),
        "ece": expected_calibration_error(probabilities, labels),
        "count": len(labels),
        "per_class_accuracy": {name: float(recall[i]) for i, name in enumerate(classes)},
        "confusion_matrix": confusion.tolist(),
    }


def plot_confusion_matrix(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = torch.tensor(confusion, dtype=torch.float)
    normalized = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.45 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    axes.set_yticks(range(len(classes)), classes, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if len(classes) <= 12:
        for i in range(len(classes)):
            for j in range(len(classes)):
                axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=6,
                          color="white" if normalized[i, j] > 0.5 else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_training_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [row["train_loss"] for row in history], label="train")
    if "val_loss" in history[0]:
        loss_axes.plot(epochs, [row["val_loss"] for row in history], label="validation")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    accuracy_axes.plot(epochs, [row["train_accuracy"] for row in history], label="train")
    if "val_accuracy" in history[0]:
        accuracy_axes.plot(epochs, [row["val_accuracy"] for row in history], label="validation")
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
