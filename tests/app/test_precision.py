"""PRECISION: image models run under bf16 autocast on CPUs with native bf16, and stay close to float32."""

from __future__ import annotations

from pathlib import Path

import torch
from servicekit import save_image_model

from app.registry import ServedModel
from app.settings import Settings
from app.tasks import RUNNERS
from app.worker import InferenceWorker
from models.checkpoint import load_checkpoint
from models.precision import cpu_supports_bf16


def _served(directory: Path, precision: str) -> ServedModel:
    settings = Settings(model_dir=directory.parent, precision=precision, warmup=False)
    checkpoint = load_checkpoint(directory)
    runner = RUNNERS["image"](checkpoint, torch.device("cpu"), settings)
    return ServedModel("m", checkpoint.manifest, checkpoint.model, runner, directory, torch.device("cpu"))


def test_auto_precision_autocasts_images_where_the_cpu_has_bf16_and_agrees_with_fp32(tmp_path: Path,
                                                                                     jpegs: list[bytes]) -> None:
    save_image_model(tmp_path, "tiny", "fastconv", {"num_classes": 10, "widths": [8, 16, 16]})
    exact, fast = _served(tmp_path / "tiny", "fp32"), _served(tmp_path / "tiny", "auto")
    assert exact.runner.autocast_dtype is None
    assert fast.runner.autocast_dtype == (torch.bfloat16 if cpu_supports_bf16() else None)
    worker = InferenceWorker(torch.device("cpu"), 8, 0, 8)
    payloads = exact.runner.prepare(jpegs[:8], [f"image {i}" for i in range(8)])
    reference = worker.compute(exact, payloads, record=False)
    approximate = worker.compute(fast, payloads, record=False)
    assert torch.allclose(approximate.sum(dim=1), torch.ones(8), atol=1e-5)  # still a distribution
    assert (approximate - reference).abs().max() < 0.02  # bf16 keeps about 3 significant digits


def test_text_models_stay_in_float32_on_the_cpu(model_dir: Path) -> None:
    settings = Settings(model_dir=model_dir, precision="auto", warmup=False)
    checkpoint = load_checkpoint(model_dir / "tiny-text")
    assert RUNNERS["text"](checkpoint, torch.device("cpu"), settings).autocast_dtype is None
