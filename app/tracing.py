"""TorchScript versions of the models the service runs on a CPU, each checked against the eager model.

Why: the service handles HTTP and runs inference in one process. An eager forward pass returns to
Python between layers and must win the GIL back each time from the event loop, which under load
holds it for milliseconds at a stretch; a traced forward runs as one call that releases the GIL.
Measured here (``cifar10-fastconv``, batch 32, bf16 autocast, 2 cores): 144 ms eager and 131 ms
traced alone, but 612 ms eager and 301 ms traced beside one busy Python thread.

The trace records autocast's casts as they happen, so TorchScript's own autocast pass must stay off
(``torch._C._jit_set_autocast_mode(False)``, process-wide; nothing else in the service is
scripted). A trace records only tensor operations, so the runner traces only architectures that
declare a pure tensor forward (``traceable = True`` on the class; Python side effects would be lost),
and every trace is checked against the eager model on a batch of another size before use: a model
that traces differently (data-dependent control flow) stays eager.

Text models cannot be traced (their shapes depend on the data: sparse n-gram counts), so a text
architecture that offers a ``scripted()`` forward (TorchScript-compiled, ``ngram_bag``) is served
through it, after the same check against eager. Its eager forward is some forty small operations:
32 posts took 40 ms alone but 111–684 ms beside a busy Python thread, against 73–97 ms scripted.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def trace_image_model(model: nn.Module, example: torch.Tensor, check: torch.Tensor,
                      autocast_dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``model`` traced on ``example`` (B, C, H, W), or None if it fails or differs from eager on ``check``."""
    device = example.device
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    torch._C._jit_set_autocast_mode(False)
    try:
        with warnings.catch_warnings(), torch.inference_mode(), autocast:
            warnings.simplefilter("ignore")  # deprecation notices, and "torch.tensor results are constants"
            traced = torch.jit.trace(model, example, check_trace=False)
            eager_out, traced_out = model(check).float(), traced(check).float()
    except Exception as error:  # an architecture the tracer cannot follow: serve it eagerly
        logger.warning("could not trace %s (%r); it runs eagerly", type(model).__name__, error)
        return None
    if eager_out.shape != traced_out.shape or not torch.allclose(eager_out, traced_out, rtol=1e-3, atol=1e-4):
        logger.warning("the trace of %s differs from the eager model; it runs eagerly", type(model).__name__)
        return None
    return traced  # type: ignore[no-any-return]


def script_text_model(model: nn.Module, check: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``model.scripted()`` when the architecture offers it and it equals eager on ``check`` (B, T) ids, else None."""
    scripted_of = getattr(model, "scripted", None)
    if scripted_of is None:
        return None
    try:
        with torch.inference_mode():
            scripted = scripted_of()
            eager_out, scripted_out = model(check).float(), scripted(check).float()
    except Exception as error:
        logger.warning("could not script %s (%r); it runs eagerly", type(model).__name__, error)
        return None
    if eager_out.shape != scripted_out.shape or not torch.allclose(eager_out, scripted_out, rtol=1e-4, atol=1e-5):
        logger.warning("the scripted %s differs from the eager model; it runs eagerly", type(model).__name__)
        return None
    return scripted  # type: ignore[no-any-return]
