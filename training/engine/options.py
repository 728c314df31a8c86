"""The options every training task shares, and the one mapping from the command line onto them.

``RunOptions`` holds the fields every task has (data, output, name, seed, device, batch size, loop
overrides, validation fraction, limit, the recorded command, refit and calibration folds); each
task's options extend it with their own (``ImageRunOptions``, ``TextRunOptions``, ``FusionOptions``).
``run_options_from_args`` fills those common fields from a parsed command line, so every command
maps ``--seed``, ``--epochs`` … the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

# The loop settings a command line may override (``--epochs`` …), as ``LoopConfig`` names them.
LOOP_OVERRIDES = ("epochs", "lr", "weight_decay", "label_smoothing", "warmup_fraction", "precision", "optimizer",
                  "save_every_steps")


@dataclasses.dataclass(kw_only=True)
class RunOptions:
    """What every training run is told, whatever its task."""

    data: Path
    output: Path | None = None
    name: str | None = None  # served model name (default: the output folder name)
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None  # None: the recipe's, adapted to the data
    loop: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the recipe's loop settings
    validation_fraction: float = 0.1
    limit: int | None = None  # train on only this many examples (quick checks)
    stop_after_steps: int | None = None  # end early as a kill would, leaving the resumable state (tests)
    command: str = ""  # the command line recorded in the manifest
    # Train on every example after validating and calibrating on held-out predictions (training.engine.refit).
    refit_full: bool = False
    # auto | 0 (one validation split) | K (K-fold out-of-fold predictions of every example, then a refit)
    calibration_folds: int | str = "auto"


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (key, value), the value read as JSON when it is JSON (``--config``)."""
    key, _, value = text.partition("=")
    if not key or not _:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def loop_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The loop settings given on the command line (absent or unset ones are left to the recipe)."""
    return {name: getattr(args, name) for name in LOOP_OVERRIDES if getattr(args, name, None) is not None}


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--warmup-fraction", type=float, help="share of the steps spent warming the rate up")
    parser.add_argument("--optimizer", choices=["sgd", "adamw", "muon"])
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 …")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--limit", type=int, help="train on only this many examples (quick checks)")
    parser.add_argument("--save-every-steps", type=int, help="write the resumable state this often (default 50)")
    parser.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)


def run_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``RunOptions`` fields of a parsed command line, as keyword arguments of a task's options.

    A command without a flag (``finetune-fusion`` has no ``--stop-after-steps``) gets the default.
    """
    return {
        "data": args.data, "output": args.output, "name": args.name, "seed": args.seed, "device": args.device,
        "batch_size": args.batch_size, "loop": loop_overrides(args), "validation_fraction": args.validation_fraction,
        "limit": args.limit, "stop_after_steps": getattr(args, "stop_after_steps", None),
        "command": getattr(args, "command_line", ""), "refit_full": getattr(args, "refit_full", False),
        "calibration_folds": getattr(args, "calibration_folds", "auto"),
    }
