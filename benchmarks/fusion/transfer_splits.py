"""Late fusion, transferred vs scratch encoders, on validation splits other than the fixed one.

``fusion-study`` compares its arms on one split (split seed 0, 640 pairs), where a point and a half
is within what the choice of split moves. This reruns the late-fusion recipe, one seed, on several
other stratified 20% splits with each side transferred or from scratch (``T``: CIFAR-10 image
encoder + 20 Newsgroups vocabulary and topic model; ``S``: neither; the two mixes; and ``T+M`` /
``S+M``, the same with the frozen pretrained MiniLM sentence encoder on the text side, as shipped),
and scores the fused answers and the same model's answers with the images left out. With
``--limits`` each variant also trains on a seeded random N of its training pairs (a learning
curve: what a refit on every pair may still gain). Writes a markdown table; held-out pairs are
never touched.

    python benchmarks/fusion/transfer_splits.py --data .cache/data/mvsa-pairs-train --splits 11,12,13,14,15
    python benchmarks/fusion/transfer_splits.py --data .cache/data/mvsa-pairs-train --variants T \
        --limits 1280,1920,all --output benchmarks/results/fusion_learning_curve.md
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.text_encoding import tokenize  # noqa: E402
from training.engine.metrics import classification_metrics  # noqa: E402
from training.fusion.data import load_pairs  # noqa: E402
from training.fusion.late import build_late, train_late_head  # noqa: E402
from training.fusion.prep import LATE_IMAGE_SIZE, SENTENCE_C, FusionOptions, prepare  # noqa: E402
from training.fusion.sentence import SentenceSource, load_sentence_source  # noqa: E402
from training.fusion.stacking import ScorerOptions  # noqa: E402
from training.fusion.text import tweet_preprocessing  # noqa: E402
from training.fusion.transfer import load_image_parent, load_text_parent  # noqa: E402

# name → (transferred image encoder, transferred text side, pretrained sentence encoder)
VARIANTS = {"T": (True, True, False), "S": (False, False, False), "Ti+St": (True, False, False),
            "Si+Tt": (False, True, False), "T+M": (True, True, True), "S+M": (False, False, True)}
LEGEND = ("T: the CIFAR-10 image encoder and the 20 Newsgroups vocabulary and topic model; S: a "
          "random frozen fastconv and the training tweets' vocabulary; Ti+St, Si+Tt: the mixes; +M: with the frozen "
          "MiniLM sentence encoder (all-MiniLM-L6-v2) and its scorer on the text side (T+M as shipped). "
          "\"Images left out\": the same model answering with every image absent.")


def run(data_dir: Path, image_from: Path, text_from: Path, splits: list[int], variants: list[str],
        limits: list[int | None], sentence_c: float) -> dict[str, Any]:
    image_parent = load_image_parent(image_from, ("fastconv",))
    text_parent = load_text_parent(text_from)
    data = load_pairs(data_dir, LATE_IMAGE_SIZE)
    options = FusionOptions(data=data_dir, arch="late", image_size=LATE_IMAGE_SIZE,
                            sentence_scorer=ScorerOptions(C=sentence_c))
    sentence: SentenceSource | None = None
    if any(VARIANTS[name][2] for name in variants):
        sentence = load_sentence_source("minilm")
    tokens: dict[str, list[list[str]]] = {}
    runs = [(name, limit) for name in variants for limit in limits]
    label = {run: run[0] if len(limits) == 1 else f"{run[0]}, {run[1] or 'all'} pairs" for run in runs}
    results: dict[str, list[dict[str, tuple[float, float]]]] = {label[run]: [] for run in runs}
    for split in splits:
        for name, limit in runs:
            use_image, use_text, use_sentence = VARIANTS[name]
            text = text_parent if use_text else None
            preprocessing = tweet_preprocessing(text.encoder.preprocessing if text else None, options.bag.max_tokens)
            key = preprocessing.cache_key()
            if key not in tokens:
                tokens[key] = tokenize(data.texts, preprocessing)
            limited = dataclasses.replace(options, limit=limit, split_seed=split)
            prep = prepare(limited, image_parent if use_image else None, text, data=data, token_lists=tokens[key],
                           sentence=sentence if use_sentence else None)
            _, logits = train_late_head(build_late(prep, limited, 0), prep, limited, 0, torch.device("cpu"))
            labels = prep.data.labels[prep.val_idx]
            scores = {}
            for answer, values in logits.items():
                metrics = classification_metrics(values, labels, prep.data.classes)
                scores[answer] = (float(metrics["accuracy"]), float(metrics["macro_f1"]))
            results[label[name, limit]].append(scores)
            print(f"split {split} {label[name, limit]}: fused {scores['fused'][0]:.4f} / {scores['fused'][1]:.3f}",
                  flush=True)
    return {"splits": splits, "results": results}


def table(report: dict[str, Any]) -> str:
    def mean_std(values: list[float]) -> str:
        return f"{statistics.fmean(values):.2%} ± {statistics.stdev(values) if len(values) > 1 else 0:.2%}"

    lines = [f"Validation splits (seeds): {', '.join(map(str, report['splits']))}; one seed each.", "",
             "| variant | fused accuracy | fused macro-F1 | images left out: accuracy | per split (fused) |",
             "| --- | --- | --- | --- | --- |"]
    for name, rows in report["results"].items():
        fused = [row["fused"][0] for row in rows]
        lines.append(f"| {name} | {mean_std(fused)} | {statistics.fmean(row['fused'][1] for row in rows):.3f} | "
                      f"{mean_std([row['text_only'][0] for row in rows])} | "
                      f"{', '.join(f'{value:.2%}' for value in fused)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--image-from", type=Path, default=ROOT / "checkpoints" / "cifar10-fastconv")
    parser.add_argument("--text-from", type=Path, default=ROOT / "checkpoints" / "20news-text")
    parser.add_argument("--splits", default="11,12,13,14,15")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--limits", default="all", help="training pairs per run, comma-separated ('all': every one)")
    parser.add_argument("--sentence-C", type=float, default=SENTENCE_C,
                        help="inverse L2 strength of the sentence scorer (+M; default: the recipe's)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "fusion_transfer_splits.md")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING)
    limits = [None if limit == "all" else int(limit) for limit in args.limits.split(",")]
    report = run(args.data, args.image_from, args.text_from, [int(s) for s in args.splits.split(",")], variants, limits,
                 args.sentence_C)
    header = ("# Late fusion, transferred vs scratch encoders, on other validation splits\n\n"
              f"`python benchmarks/fusion/transfer_splits.py --splits {args.splits} --variants {args.variants} "
              f"--limits {args.limits} --sentence-C {args.sentence_C}`\n\n{LEGEND}\n\n")
    args.output.write_text(header + table(report))
    print(table(report))


if __name__ == "__main__":
    main()
