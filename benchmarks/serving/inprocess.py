"""The in-process limit: the served model's throughput at each batch size, with no HTTP in the way.

Uses the service's own code path (``TaskRunner.prepare`` for decoding, ``InferenceWorker.compute``
for collate → forward → calibrated softmax, in a worker thread as the service does), so the gap to
the HTTP numbers is the serving overhead.
"""

from __future__ import annotations

import itertools
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


def measure_limit(checkpoint_dir: Path, samples: list[bytes] | list[str], batch_sizes: list[int], seconds: float,
                  device: str = "cpu") -> dict[str, Any]:
    """Items/s by batch size; decoding (or tokenising) is timed over ``samples`` in turn."""
    settings = Settings(model_dir=checkpoint_dir.parent, device=device, warmup=False)
    torch_device = settings.torch_device()
    checkpoint = load_checkpoint(checkpoint_dir, torch_device)
    runner = RUNNERS[checkpoint.manifest.task](checkpoint, torch_device, settings)
    runner.compile()  # the TorchScript forward the service builds once ready (TRACE_MODELS)
    served = ServedModel(checkpoint.manifest.name, checkpoint.manifest, checkpoint.model, runner, checkpoint_dir,
                         torch_device)
    worker = InferenceWorker(torch_device, max(batch_sizes), 0, 1)
    turn = itertools.cycle(samples)
    decode_rate = _rate(lambda: runner.prepare([next(turn)], ["sample"]), 1, seconds)  # decoding or tokenising
    # Batches drawn in turn from the payloads of the first samples: texts differ in length, and a
    # batch costs what its longest text costs, so one repeated text would flatter or wrong the model.
    payloads = runner.prepare(samples[: max(batch_sizes)], ["sample"] * min(len(samples), max(batch_sizes)))
    payloads = list(itertools.islice(itertools.cycle(payloads), 2 * max(batch_sizes)))

    def batches(size: int) -> Any:
        starts = itertools.cycle(range(0, max(batch_sizes), size))
        return lambda: worker.compute(served, payloads[(start := next(starts)):start + size], False)

    with ThreadPoolExecutor(max_workers=1) as thread:  # like the service: inference runs in its own thread
        rates = {size: thread.submit(_rate, batches(size), size, seconds).result() for size in batch_sizes}
    best = max(rates, key=lambda size: rates[size])
    return {
        "model": served.name, "device": str(torch_device), "torch_threads": torch.get_num_threads(),
        "items_per_s_by_batch_size": rates, "best_batch_size": best, "best_items_per_s": rates[best],
        "decode_images_per_s_one_thread": decode_rate,
    }
