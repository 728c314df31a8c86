"""Which reduced precision a device runs natively: shared by the training loop and the service.

bfloat16 autocast roughly halves the time of a convolution on CPUs with native bfloat16 maths
(AVX-512 BF16, AMX) and on CUDA; elsewhere it is emulated and slower than float32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``device`` runs faster than float32, or None (stay in float32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None
