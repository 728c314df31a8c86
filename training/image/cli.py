"""The image commands of ``python -m training``: ``pretrain-image``, ``ensemble-image``, ``finetune-image``.

``pretrain-image`` trains an image classifier from scratch (an ImageFolder tree or the CIFAR-10
python batches); ``ensemble-image`` joins runs of one recipe on one split into one calibrated model
(``training.image.ensemble``); ``finetune-image --from CHECKPOINT`` fits a model to a user's own
classes, with the recipe adapted to the size of the data (``training.image.finetune``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.engine.options import add_loop_arguments, key_value, run_options_from_args


def _image_command(args: argparse.Namespace) -> dict[str, Any]:
    from training.engine.common import init_distributed
    from training.image.task import ImageRunOptions, run_image_training

    init_distributed()
    return run_image_training(ImageRunOptions(
        **run_options_from_args(args), architecture=getattr(args, "arch", "fastconv"),
        model_config=dict(getattr(args, "config", None) or []), parent=getattr(args, "from_checkpoint", None),
        calibration_from=getattr(args, "calibration_from", None), freeze=getattr(args, "freeze", "auto"),
        class_weights=getattr(args, "class_weights", "auto"), split_seed=getattr(args, "split_seed", None),
    ))


def _ensemble_command(args: argparse.Namespace) -> dict[str, Any]:
    from training.image.ensemble import ensemble_image

    return ensemble_image(args.members, args.data, args.output, name=args.name, views=args.views, device=args.device,
                          command=getattr(args, "command_line", ""))


def add_commands(commands: Any) -> None:
    pretrain = commands.add_parser("pretrain-image", help="train an image classifier from scratch")
    pretrain.add_argument("--data", type=Path, required=True, help="ImageFolder tree or CIFAR-10 python-batch folder")
    pretrain.add_argument("--output", type=Path, required=True, help="checkpoint directory to write")
    pretrain.add_argument("--arch", default="fastconv", help="architecture name (fastconv, lenet, trunk)")
    pretrain.add_argument("--config", type=key_value, action="append", metavar="KEY=VALUE",
                          help="architecture config override, e.g. widths=[96,384,384]")
    pretrain.add_argument("--name", help="model name served by the API (default: the output folder name)")
    pretrain.add_argument("--refit-full", action="store_true",
                          help="train on every image (no validation split); needs --calibration-from")
    pretrain.add_argument("--calibration-from", type=Path, metavar="CHECKPOINT",
                          help="with --refit-full: the same recipe trained with its validation split, whose "
                               "temperature and validation metrics the refit takes over")
    pretrain.add_argument("--split-seed", type=int, metavar="SEED",
                          help="seed of the validation split (default: --seed); members of one ensemble "
                               "(python -m training ensemble-image) share it and differ in --seed")
    add_loop_arguments(pretrain)
    pretrain.set_defaults(handler=_image_command)

    ensemble = commands.add_parser("ensemble-image", help="join image runs of one recipe and split into one model")
    ensemble.add_argument("members", type=Path, nargs="+", metavar="CHECKPOINT",
                          help="pretrain-image runs with one --split-seed and different --seed")
    ensemble.add_argument("--data", type=Path, required=True, help="the data the members were trained on")
    ensemble.add_argument("--output", type=Path, required=True, help="checkpoint directory to write")
    ensemble.add_argument("--name", help="model name served by the API (default: the output folder name)")
    ensemble.add_argument("--views", choices=["none", "flip", "flip-translate"], default="flip",
                          help="test-time views per member: none (the image alone: half the compute of flip), "
                               "flip (and its mirror), flip-translate (three times the compute of flip)")
    ensemble.add_argument("--device", default="auto")
    ensemble.set_defaults(handler=_ensemble_command)

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
