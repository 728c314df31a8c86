"""What "refit on all data" means, for every task, and how its manifest says so.

A refit validates and calibrates on held-out predictions (one validation split, or out-of-fold
predictions of every example), then trains the same recipe with the same seed on every example and
keeps that calibration: the temperature and the validation metrics in the manifest are those of
the held-out predictions, the weights are the refit's, and ``refit_record`` is the manifest's note.

The held-out predictions may come from the same command (``train-text --refit-full``,
``--calibration-folds K`` of every task, ``finetune-fusion --refit-full``) or from an earlier run of the
same recipe, seed and data (``pretrain-image --refit-full --calibration-from TUNING_RUN``).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Where a refit's calibration and validation metrics were measured."""

    description: str

    @classmethod
    def split(cls, validation: int | str, train: int | str, unit: str, run: str | None = None) -> HeldOut:
        """A validation split of ``validation`` examples, scored by the fit on the other ``train``
        (``run``: the earlier checkpoint that fit was, when not this command)."""
        of = f" of {run!r}" if run else ""
        return cls(f"the {validation} validation {unit}{of} (scored by the fit on the other {train})")

    @classmethod
    def folds(cls, folds: int, unit: str) -> HeldOut:
        """Out-of-fold predictions of every example, each by the fit on the other folds."""
        return cls(f"{folds}-fold out-of-fold predictions of all {unit} (each fold scored by the fit on the others)")


def refit_note(held_out: HeldOut, examples: int, unit: str, caveat: str = "") -> str:
    """The manifest's sentence, one wording for every task (``caveat``: a task's own last clause)."""
    note = (f"validation metrics and calibration measured on {held_out.description}, by the same recipe and seed, "
            f"before the refit on all {examples} {unit}; the shipped model keeps that calibration and has no "
            f"held-out {unit} of its own")
    return f"{note}; {caveat}" if caveat else note


def refit_record(held_out: HeldOut, examples: int, unit: str, caveat: str = "", **details: Any) -> dict[str, Any]:
    """The validation metrics' refit entries: ``refit_full``, the ``note``, and a task's ``details``."""
    return {"refit_full": True, "note": refit_note(held_out, examples, unit, caveat), **details}
