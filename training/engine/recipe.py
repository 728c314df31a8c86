"""The recipe shape every task shares, and its one merge rule.

A ``Recipe`` is what is known to work for one architecture: the loop settings (``LoopConfig``
fields), the batch size, the model config, the preprocessing, and ``extra`` for a task's own knobs
(image flips, text vocabulary limits, fusion loss weighting). ``merge_recipes`` layers recipes key
by key, the later winning: the task's recipe for the architecture, then the command line's overrides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from training.engine.loop import LoopConfig

LOOP_FIELDS = frozenset(f.name for f in dataclasses.fields(LoopConfig))


def _empty() -> Mapping[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Recipe:
    loop: Mapping[str, Any] = dataclasses.field(default_factory=_empty)  # LoopConfig fields
    batch_size: int | None = None
    model: Mapping[str, Any] = dataclasses.field(default_factory=_empty)  # the architecture's config
    preprocessing: Mapping[str, Any] = dataclasses.field(default_factory=_empty)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=_empty)  # the task's own settings

    def __post_init__(self) -> None:
        unknown = set(self.loop) - LOOP_FIELDS
        if unknown:  # a misspelt loop setting would otherwise be dropped without a word
            raise ValueError(f"recipe loop settings {sorted(unknown)} are not LoopConfig fields")

    def loop_config(self, seed: int, **fixed: Any) -> LoopConfig:
        """The recipe's loop settings as a ``LoopConfig``, with ``seed`` and ``fixed`` (a task's own) on top."""
        return LoopConfig(**{**self.loop, "seed": seed, **fixed})


def merge_recipes(base: Recipe, *layers: Recipe) -> Recipe:
    """``base`` with each of ``layers`` on top, key by key (a layer's batch size when it has one)."""
    merged = base
    for layer in layers:
        merged = Recipe(
            loop={**merged.loop, **layer.loop},
            batch_size=layer.batch_size if layer.batch_size is not None else merged.batch_size,
            model={**merged.model, **layer.model},
            preprocessing={**merged.preprocessing, **layer.preprocessing},
            extra={**merged.extra, **layer.extra},
        )
    return merged
