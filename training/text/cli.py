"""The text commands of ``python -m training``: ``train-text``, ``finetune-text``, ``transfer-study``.

``train-text`` (alias ``pretrain-text``) trains any text architecture from scratch; its default,
``ngram_bag``, is the served text model. ``finetune-text --from IMAGE_CHECKPOINT`` starts a ``trunk``
text model from an image-pretrained shared trunk. ``transfer-study`` compares scratch and
image-initialised trunks at several label budgets against a TF-IDF + linear SVM reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.engine.options import add_loop_arguments, key_value, run_options_from_args

REMOVABLE_HELP = "comma-separated parts to strip from posts: headers,footers,quotes (default: keep all)"


def _grid(text: str) -> tuple[str, tuple[float, ...]]:
    """``ARM=V,V,…`` → (arm, values): one arm's learning-rate grid for ``transfer-study``."""
    arm, separator, values = text.partition("=")
    try:
        grid = tuple(float(value) for value in values.split(","))
    except ValueError:
        grid = ()
    if not separator or not arm or not grid or any(not value > 0 for value in grid):
        raise argparse.ArgumentTypeError(f"expected ARM=V,V with positive values, got {text!r}")
    return arm, grid


def _preprocessing_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.lowercase is not None:
        values["lowercase"] = args.lowercase
    if args.remove is not None:
        values["remove"] = [part for part in args.remove.split(",") if part]
    if args.max_tokens is not None:
        values["max_tokens"] = args.max_tokens
    if args.header_fields is not None:
        values["header_fields"] = [part for part in args.header_fields.split(",") if part]
    return values


def _options(args: argparse.Namespace, architecture: str, parent: Path | None = None, freeze: str = "none") -> Any:
    from training.text.task import TextRunOptions

    ngram: dict[str, Any] = {}
    if getattr(args, "classifier", None):
        ngram["classifier"] = args.classifier
    if getattr(args, "C", None) is not None:
        ngram["C"] = args.C
    if getattr(args, "max_char_ngrams", None) is not None:
        ngram["max_char_ngrams"] = args.max_char_ngrams
    return TextRunOptions(
        **run_options_from_args(args), architecture=architecture,
        model_config=dict(getattr(args, "config", None) or []), preprocessing=_preprocessing_overrides(args),
        ngram=ngram, min_freq=args.min_freq, max_vocab=args.max_vocab, parent=parent, freeze=freeze,
        label_fraction=args.label_fraction, class_weights=args.class_weights,
    )


def _train_command(args: argparse.Namespace) -> dict[str, Any]:
    from training.text.task import run_text_training

    return run_text_training(_options(args, args.arch))


def _finetune_command(args: argparse.Namespace) -> dict[str, Any]:
    from training.text.task import run_text_training

    return run_text_training(_options(args, "trunk", parent=args.from_checkpoint, freeze=args.freeze))


def _study_command(args: argparse.Namespace) -> dict[str, Any]:
    from training.studies.transfer import StudyOptions, run_transfer_study

    return run_transfer_study(StudyOptions(
        image_checkpoint=args.from_checkpoint, data=args.data, output=args.output, quick=args.quick,
        compare_checkpoint=args.compare_from, arms=tuple(args.arms) if args.arms else None,
        grids=dict(args.grid or []),
        fractions=tuple(args.fractions) if args.fractions else None,
        seeds=tuple(args.seeds) if args.seeds else None, epochs=args.epochs, max_tokens=args.max_tokens,
        device=args.device, report_only=args.report_only,
    ))


def _add_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="folder per class (20 Newsgroups bydate layout), or a .csv / .jsonl with text,label")
    parser.add_argument("--output", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--name", help="model name served by the API (default: the output folder name)")
    parser.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--remove", help=REMOVABLE_HELP)
    parser.add_argument("--header-fields", help="comma-separated header lines to tag, e.g. subject,from,organization"
                        " ('' for none)")
    parser.add_argument("--max-tokens", type=int, help="keep the first N tokens of each post")
    parser.add_argument("--min-freq", type=int, help="vocabulary: minimum token count in the training posts")
    parser.add_argument("--max-vocab", type=int, help="vocabulary: most ids in all (with <pad> and <unk>)")
    parser.add_argument("--label-fraction", type=float, default=1.0, help="train on this stratified share of labels")
    parser.add_argument("--calibration-folds", default="auto", metavar="K|auto",
                        help="validate and calibrate on K-fold out-of-fold predictions of every post, then refit on "
                             "all of them (auto: 5 folds when the validation split would hold under 500 posts; 0: the split)")
    parser.add_argument("--class-weights", choices=["auto", "balanced", "none"], default="auto",
                        help="weight classes inversely to their size (auto: when the largest outnumbers the smallest "
                             "by more than 1.5×)")
    add_loop_arguments(parser)


def add_commands(commands: Any) -> None:
    for name in ("train-text", "pretrain-text"):
        train = commands.add_parser(name, help="train a text classifier from scratch (default: ngram_bag)")
        _add_text_arguments(train)
        train.add_argument("--arch", default="ngram_bag", choices=["ngram_bag", "bilstm", "trunk"])
        train.add_argument("--config", type=key_value, action="append", metavar="KEY=VALUE",
                           help="architecture config override, e.g. hidden_size=128")
        train.add_argument("--classifier", choices=["svm", "logreg"], help="ngram_bag: the linear fit")
        train.add_argument("--C", type=float, help="ngram_bag: inverse regularisation strength")
        train.add_argument("--max-char-ngrams", type=int, help="ngram_bag: character n-gram features (0: none)")
        train.add_argument("--refit-full", action="store_true",
                           help="validate and calibrate on the split, then refit on every post")
        train.set_defaults(handler=_train_command)

    finetune = commands.add_parser("finetune-text", help="text trunk model initialised from an image trunk checkpoint")
    finetune.add_argument("--from", dest="from_checkpoint", type=Path, required=True,
                          help="image checkpoint of the 'trunk' architecture")
    finetune.add_argument("--freeze", default="none", choices=["none", "trunk-except-norms", "trunk"],
                          help="what of the shared trunk stays fixed (default: nothing)")
    finetune.add_argument("--config", type=key_value, action="append", metavar="KEY=VALUE",
                          help="trunk config override (e.g. dropout=0.1); dims come from the checkpoint")
    _add_text_arguments(finetune)
    finetune.set_defaults(handler=_finetune_command)

    study = commands.add_parser("transfer-study", help="scratch vs image-initialised trunk at 1/10/100%% of labels")
    study.add_argument("--from", dest="from_checkpoint", type=Path, required=True, help="image trunk checkpoint")
    study.add_argument("--compare-from", type=Path,
                       help="a second image trunk checkpoint (e.g. a weaker source): adds the previous-image-frozen arm")
    study.add_argument("--data", type=Path, required=True)
    study.add_argument("--output", type=Path, required=True, help="results folder (table, plot, raw JSON)")
    study.add_argument("--arms", nargs="+", help="run only these arms (default: all)")
    study.add_argument("--grid", type=_grid, action="append", metavar="ARM=V,V",
                       help="replace an arm's learning-rate grid (C for tfidf-svm), e.g. image-frozen=0.1,0.3")
    study.add_argument("--quick", action="store_true", help="a tiny budget for tests: 1 seed, small data, 1 epoch")
    study.add_argument("--fractions", type=float, nargs="+", help="label budgets (default 0.01 0.1 1.0)")
    study.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2)")
    study.add_argument("--epochs", type=int, help="epochs per run (default from the study recipe)")
    study.add_argument("--max-tokens", type=int, help="tokens per post for the study (default 64)")
    study.add_argument("--device", default="auto")
    study.add_argument("--report-only", action="store_true",
                       help="write the table and plot from the runs already in OUTPUT/runs.json (marks partial cells)")
    study.set_defaults(handler=_study_command)
