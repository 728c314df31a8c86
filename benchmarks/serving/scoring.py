"""Score a checkpoint the way a client sees it: served alone by the real service, metrics of what it returns.

``serve_checkpoint`` starts ``python -m app.serve`` on a temporary ``MODEL_DIR`` holding a copy of one
checkpoint (the service skips links out of ``MODEL_DIR``); ``distribution_metrics`` turns the
calibrated distributions the service returned into accuracy, macro-F1, ECE (15 equal-width bins, as
``training.engine.calibration``) and NLL.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.serving import harness
from training.engine.metrics import classification_metrics


@contextlib.contextmanager
def serve_checkpoint(checkpoint: Path, env: dict[str, str] | None = None) -> Iterator[harness.ServerProcess]:
    """The service running on ``checkpoint`` alone (under its manifest's name, with ``env`` on top of
    its defaults), stopped on exit."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as model_dir, tempfile.TemporaryDirectory() as log_dir:
        shutil.copytree(checkpoint, Path(model_dir) / manifest["name"])
        server = harness.start_service("score", {**(env or {}), "MODEL_DIR": model_dir}, Path(log_dir))
        try:
            yield server
        finally:
            server.stop()


def distribution_metrics(rows: list[list[float]], labels: list[int], classes: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1, ECE and NLL of the returned distributions (one row per example, class order)."""
    log_probabilities = torch.tensor(rows, dtype=torch.float64).clamp_min(1e-12).log()  # softmax gives them back
    metrics = classification_metrics(log_probabilities, torch.tensor(labels), classes)
    return {key: metrics[key] for key in ("accuracy", "macro_f1", "ece", "nll")}
