"""The training command line: ``python -m training <command> …``.

Commands: ``pretrain-image``, ``finetune-image``, ``evaluate`` (and the text, fusion and export commands
their modules add). Known failures (missing path, empty class folder, unreadable image, bad
checkpoint) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointError
from models.registry import UnknownModelError
from training.image_data import DataError


def _key_value(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    if not key or not _:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _loop_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("epochs", "lr", "weight_decay", "label_smoothing", "precision", "optimizer", "save_every_steps")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"])
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 …")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--limit", type=int, help="train on only this many examples (quick checks)")
    parser.add_argument("--save-every-steps", type=int, help="write the resumable state this often (default 50)")
    parser.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)


def _image_command(args: argparse.Namespace) -> dict[str, Any]:
    from training.common import init_distributed
    from training.image_task import ImageRunOptions, run_image_training

    init_distributed()
    return run_image_training(ImageRunOptions(
        data=args.data, output=args.output, architecture=getattr(args, "arch", "fastconv"),
        model_config=dict(getattr(args, "config", None) or []), loop=_loop_overrides(args),
        batch_size=args.batch_size, validation_fraction=args.validation_fraction, seed=args.seed,
        device=args.device, name=args.name, parent=getattr(args, "from_checkpoint", None),
        limit=args.limit, stop_after_steps=args.stop_after_steps, command=args.command_line,
        refit_full=getattr(args, "refit_full", False), calibration_from=getattr(args, "calibration_from", None),
        freeze=getattr(args, "freeze", "auto"), class_weights=getattr(args, "class_weights", "auto"),
        calibration_folds=getattr(args, "calibration_folds", "auto"),
    ))


def _evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, device=args.device)


# The modules that add the text, fusion and export commands (``add_commands(subparsers)``).
TASK_COMMANDS = ("training.text_cli", "training.fusion_cli", "training.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain-image", help="train an image classifier from scratch")
    pretrain.add_argument("--data", type=Path, required=True, help="ImageFolder tree or CIFAR-10 python-batch folder")
    pretrain.add_argument("--output", type=Path, required=True, help="checkpoint directory to write")
    pretrain.add_argument("--arch", default="fastconv", help="architecture name (fastconv, lenet, trunk)")
    pretrain.add_argument("--config", type=_key_value, action="append", metavar="KEY=VALUE",
                          help="architecture config override, e.g. widths=[96,384,384]")
    pretrain.add_argument("--name", help="model name served by the API (default: the output folder name)")
    pretrain.add_argument("--refit-full", action="store_true",
                          help="train on every image (no validation split); needs --calibration-from")
    pretrain.add_argument("--calibration-from", type=Path, metavar="CHECKPOINT",
                          help="with --refit-full: the same recipe trained with its validation split, whose "
                               "temperature and validation metrics the refit takes over")
    add_loop_arguments(pretrain)
    pretrain.set_defaults(handler=_image_command)

    finetune = commands.add_parser("finetune-image", help="fine-tune an image checkpoint on your own classes")
    finetune.add_argument("--from", dest="from_checkpoint", type=Path, required=True, help="image checkpoint to start from")
    finetune.add_argument("--data", type=Path, required=True, help="ImageFolder tree: one folder per class")
    finetune.add_argument("--output", type=Path, required=True)
    finetune.add_argument("--name")
    finetune.add_argument("--freeze", choices=["auto", "backbone", "none"], default="auto",
                          help="keep the pretrained backbone fixed and fit only the classifier (auto: when the median "
                               "class has fewer than 500 images)")
    finetune.add_argument("--class-weights", choices=["auto", "balanced", "none"], default="auto",
                          help="weight classes inversely to their size (auto: when the largest outnumbers the "
                               "smallest by more than 1.5×)")
    finetune.add_argument("--calibration-folds", default="auto", metavar="K|auto",
                          help="calibrate and validate on K-fold out-of-fold predictions of every image, then train "
                               "on all (auto: 5 folds when the validation split would hold under 500 images; 0: the split)")
    add_loop_arguments(finetune)
    finetune.set_defaults(handler=_image_command)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a labelled data set")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--batch-size", type=int, default=500)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    evaluate.set_defaults(handler=_evaluate_command)

    for module_name in TASK_COMMANDS:  # each task registers its commands into this one parser
        importlib.import_module(module_name).add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Recorded in every manifest: the exact command that reproduces the checkpoint.
    args.command_line = "python -m training " + shlex.join(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args.handler(args)
    except (DataError, CheckpointError, UnknownModelError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2))
    return 0
