"""Runs the real service (``uvicorn app.main:app``) with one test-only architecture registered.

``probe`` is LeNet (same weights layout) that can sleep in ``forward`` (slow batches), wait for a file
while being built (a start-up the test controls), raise CUDA out-of-memory for batches above a size, and fail a batch
holding a constant-colour image. Tests save a LeNet with ``architecture="probe"`` and start this
script with uvicorn's command-line arguments.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import uvicorn

from models.image_cnn import LeNet, LeNetConfig
from models.registry import register_model


@dataclasses.dataclass
class ProbeConfig(LeNetConfig):
    sleep_s: float = 0.0
    load_gate: str = ""  # building waits until this file exists (a start-up the test controls)
    oom_above: int = -1  # raise CUDA OOM for batches larger than this (-1: never)


class Probe(LeNet):
    traceable = False  # sleeping and raising are Python side effects a trace would drop

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__(LeNetConfig(config.num_classes, config.in_channels))
        self.probe = config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if 0 <= self.probe.oom_above < len(images):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by the probe model)")
        flat = images.flatten(2)  # (B, C, H·W)
        if bool((flat.amax(dim=2) == flat.amin(dim=2)).all(dim=1).any()):
            raise RuntimeError("probe model: refusing a constant-colour image")
        time.sleep(self.probe.sleep_s)
        return super().forward(images)


@register_model("probe", ProbeConfig)
def build_probe(config: ProbeConfig) -> Probe:
    if config.load_gate:
        gate, until = Path(config.load_gate), time.monotonic() + 120
        while not gate.exists() and time.monotonic() < until:
            time.sleep(0.02)
    return Probe(config)


if __name__ == "__main__":
    uvicorn.main()
