"""TorchScript versions of the models the service runs on a CPU, each checked against the eager model.

Why: the service handles HTTP and runs inference in one process. An eager forward pass returns to
Python between layers and must win the GIL back each time from the event loop, which under load
holds it for milliseconds at a stretch; a traced forward runs as one call that releases the GIL.
Beside a busy Python thread the traced forward takes about half the eager one's time (measured in
docs/serving.md#tracing).

The trace records autocast's casts as they happen, so TorchScript's own autocast pass must stay off
(``torch._C._jit_set_autocast_mode(False)``, process-wide; nothing else in the service is
scripted). A trace records only tensor operations, so the runner traces only architectures that
declare a pure tensor forward (``traceable = True`` on the class; Python side effects would be lost),
and every trace is checked against the eager model on a batch of another size before use: a model
that traces differently (data-dependent control flow) stays eager.

Text models cannot be traced (their shapes depend on the data: sparse n-gram counts), so a text
architecture that offers a ``scripted()`` forward (TorchScript-compiled, ``ngram_bag``) is served
through it, after the same check against eager (why and what it gains: ``NgramBagClassifier.scripted``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


Forward = Callable[[torch.Tensor], torch.Tensor]


def _checked(model: nn.Module, compile_forward: Callable[[], Forward], check: torch.Tensor,
             context: contextlib.AbstractContextManager[Any],
             how: str, rtol: float, atol: float) -> Forward | None:
    """``compile_forward()``, if it builds under ``context`` and equals ``model`` on ``check``, else None."""
    name = type(model).__name__
    try:
        with context, torch.inference_mode():
            compiled = compile_forward()
            eager_out, compiled_out = model(check).float(), compiled(check).float()
    except Exception as error:  # an architecture TorchScript cannot follow: serve it eagerly
        logger.warning("could not %s %s (%r); it runs eagerly", how, name, error)
        return None
    if eager_out.shape != compiled_out.shape or not torch.allclose(eager_out, compiled_out, rtol=rtol, atol=atol):
        logger.warning("%s as TorchScript (%s) differs from the eager model; it runs eagerly", name, how)
        return None
    return compiled


def trace_image_model(model: nn.Module, example: torch.Tensor, check: torch.Tensor,
                      autocast_dtype: torch.dtype | None) -> Forward | None:
    """``model`` traced on ``example`` (B, C, H, W), or None if it fails or differs from eager on ``check``."""
    device = example.device
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    torch._C._jit_set_autocast_mode(False)

    def trace() -> Forward:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices, and "torch.tensor results are constants"
            return torch.jit.trace(model, example, check_trace=False)  # type: ignore[no-any-return]

    return _checked(model, trace, check, autocast, "trace", rtol=1e-3, atol=1e-4)


def script_text_model(model: nn.Module, check: torch.Tensor) -> Forward | None:
    """``model.scripted()`` when the architecture offers it and it equals eager on ``check`` (B, T) ids, else None."""
    scripted_of = getattr(model, "scripted", None)
    if scripted_of is None:
        return None
    return _checked(model, scripted_of, check, contextlib.nullcontext(), "script", rtol=1e-4, atol=1e-5)
