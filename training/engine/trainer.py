"""The trainer protocol every task implements, and the one driver that runs it.

A task's trainer is four stages, each handed what the one before returned:

- ``prepare(options)``: load the data, hold out what validation and calibration need (a split or
  folds); fail here, before any training, on bad options or data;
- ``build(options, prepared)``: the model to train, initialised (from scratch or a parent), with
  what it fixes of the preprocessing where prepare left that open (an image model's normalisation);
- ``fit(options, prepared, built)``: train it, score the held-out examples, and refit on every
  example when the run asks for it (``training.engine.refit``); or ``Stopped`` when the run ended early;
- ``export(options, prepared, fitted)``: calibrate, write the checkpoint and its plots, return the summary.

``run_trainer`` runs them in that order and logs each stage and its time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Protocol, TypeVar

logger = logging.getLogger(__name__)

OptionsT = TypeVar("OptionsT", contravariant=True)
PreparedT = TypeVar("PreparedT")
BuiltT = TypeVar("BuiltT")
FittedT = TypeVar("FittedT")


@dataclasses.dataclass(frozen=True)
class Stopped:
    """A run ended by ``stop_after_steps`` before its last epoch: its resumable state is left behind."""

    state: Path

    def summary(self) -> dict[str, Any]:
        return {"stopped": True, "state": str(self.state)}


class Trainer(Protocol[OptionsT, PreparedT, BuiltT, FittedT]):
    task: str  # the manifest's task: image, text, multimodal

    def prepare(self, options: OptionsT) -> PreparedT: ...

    def build(self, options: OptionsT, prepared: PreparedT) -> BuiltT: ...

    def fit(self, options: OptionsT, prepared: PreparedT, built: BuiltT) -> FittedT | Stopped: ...

    def export(self, options: OptionsT, prepared: PreparedT, fitted: FittedT) -> dict[str, Any]: ...


def run_trainer(trainer: Trainer[OptionsT, PreparedT, BuiltT, FittedT], options: OptionsT) -> dict[str, Any]:
    """prepare → build → fit → export; the summary of the written checkpoint (or of the stopped run)."""
    last = time.perf_counter()

    def done(stage: str) -> None:
        nonlocal last
        now = time.perf_counter()
        logger.info("%s: %s done (%.1f s)", trainer.task, stage, now - last)
        last = now

    prepared = trainer.prepare(options)
    done("prepare")
    built = trainer.build(options, prepared)
    done("build")
    fitted = trainer.fit(options, prepared, built)
    done("fit")
    if isinstance(fitted, Stopped):
        logger.info("%s: stopped early; resumable state in %s", trainer.task, fitted.state)
        return fitted.summary()
    summary = trainer.export(options, prepared, fitted)
    done("export")
    return summary
