"""The training command line: ``python -m training <command> …``.

This module is the one parser; every command comes from the module that owns it (``TASK_COMMANDS``):
``pretrain-image`` and ``finetune-image`` from ``training.image.cli``, ``evaluate`` from
``training.evaluate``, the text and fusion commands from ``training.text.cli`` and
``training.fusion.cli``, ``export`` from ``training.export``; the flags every training command shares,
and their mapping onto the options, from ``training.engine.options``. Known failures (missing path, empty
class folder, unreadable image, bad checkpoint) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shlex
import sys

from models.checkpoint import CheckpointError
from models.registry import UnknownModelError
from training.image.data import DataError

# The modules that add the commands (``add_commands(subparsers)``), in the order ``--help`` lists them:
# each task's own, and the two that take any task's checkpoint (``evaluate``, ``export``).
TASK_COMMANDS = ("training.image.cli", "training.evaluate", "training.text.cli", "training.fusion.cli", "training.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

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
