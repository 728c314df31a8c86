"""The in-process limit: the served model's throughput at each batch size, with no HTTP in the way.

Uses the service's own code path (``TaskRunner.prepare`` for decoding, ``InferenceWorker.compute``
for collate → forward → calibrated softmax, in a worker thread as the service does), so the gap to
the HTTP numbers is the serving overhead.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from app.registry import ServedModel
from app.settings import Settings
from app.tasks import RUNNERS
from app.worker import InferenceWorker
from models.checkpoint import load_checkpoint


def _rate(function: Any, items: int, seconds: float) -> float:
    function()  # warm-up
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 3:
        function()
        calls += 1
    return calls * items / elapsed


def measure_limit(checkpoint_dir: Path, sample: bytes | str, batch_sizes: list[int], seconds: float,
                  device: str = "cpu") -> dict[str, Any]:
    settings = Settings(model_dir=checkpoint_dir.parent, device=device, warmup=False)
    torch_device = settings.torch_device()
    checkpoint = load_checkpoint(checkpoint_dir, torch_device)
    runner = RUNNERS[checkpoint.manifest.task](checkpoint, torch_device, settings)
    served = ServedModel(checkpoint.manifest.name, checkpoint.manifest, checkpoint.model, runner, checkpoint_dir,
                         torch_device)
    worker = InferenceWorker(torch_device, max(batch_sizes), 0, 1)
    payload = runner.prepare([sample], ["sample"])[0]
    decode_rate = _rate(lambda: runner.prepare([sample], ["sample"]), 1, seconds)  # decoding or tokenising
    with ThreadPoolExecutor(max_workers=1) as thread:  # like the service: inference runs in its own thread
        rates = {size: thread.submit(_rate, lambda size=size: worker.compute(served, [payload] * size, False), size,
                                     seconds).result() for size in batch_sizes}
    best = max(rates, key=lambda size: rates[size])
    return {
        "model": served.name, "device": str(torch_device), "torch_threads": torch.get_num_threads(),
        "items_per_s_by_batch_size": rates, "best_batch_size": best, "best_items_per_s": rates[best],
        "decode_images_per_s_one_thread": decode_rate,
    }
