"""Text recipes on a *temporal* validation split: each newsgroup's latest posts held out.

Usage: ``python benchmarks/text/temporal_split.py --data /work/data/20news-bydate-train
[--variant NAME="train-text options"]… [--output benchmarks/text/temporal.md]``. A variant whose
options start with ``finetune-text`` runs that command instead (an image-initialised trunk model).
``--split-only`` writes the split (``WORK/split/train`` and ``WORK/split/val``) and stops, for a
model trained on the earlier posts by hand and scored through the service
(``benchmarks/text/score_service.py``).

The held-out 20 Newsgroups test posts are *later* than the training posts (the "bydate" split), so
a random validation split overstates what a model will score on them: the scikit-learn reference
(TF-IDF word 1–2-grams + LinearSVC) gets 92.7% on a random split of the training posts and 86.2% on
the test posts. Article numbers grow with time within a newsgroup, so holding out the highest
numbers of each class gives a split that is later than the rest, like the test split, and measures
how a recipe holds up as topics drift. Each variant is trained with ``python -m training
train-text`` on the earlier posts and scored with ``python -m training evaluate`` on the later ones;
the reference runs on the same split.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger("temporal_split")


def temporal_split(data: Path, target: Path, fraction: float) -> tuple[int, int]:
    """Link each class's posts into ``target/train`` and ``target/val``: the latest ``fraction`` of
    every class (by article number, the file name) goes to ``val``. Returns the two counts."""
    counts = [0, 0]
    for folder in sorted(path for path in data.iterdir() if path.is_dir()):
        posts = sorted((path for path in folder.iterdir() if path.is_file()),
                       key=lambda path: (int(path.name) if path.name.isdigit() else -1, path.name))
        cut = len(posts) - round(len(posts) * fraction)
        for index, part in enumerate(("train", "val")):
            chunk = posts[:cut] if index == 0 else posts[cut:]
            (target / part / folder.name).mkdir(parents=True, exist_ok=True)
            for post in chunk:
                os.symlink(post.resolve(), target / part / folder.name / post.name)
            counts[index] += len(chunk)
    return counts[0], counts[1]


def reference_accuracy(split: Path) -> float:
    """TF-IDF word 1–2-grams + LinearSVC (scikit-learn defaults), trained on train, scored on val."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    def read(part: str) -> tuple[list[str], list[str]]:
        posts = sorted((split / part).glob("*/*"))
        return [post.read_text(encoding="latin-1") for post in posts], [post.parent.name for post in posts]

    (texts, labels), (texts_val, labels_val) = read("train"), read("val")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    classifier = LinearSVC().fit(vectorizer.fit_transform(texts), labels)
    predicted = classifier.predict(vectorizer.transform(texts_val))
    return sum(p == t for p, t in zip(predicted, labels_val, strict=True)) / len(labels_val)


def run_variant(split: Path, runs: Path, name: str, options: str) -> dict[str, float]:
    """Train ``name`` with the ``train-text`` (or ``finetune-text …``) options on the early posts; its
    metrics on the late ones.
    Both commands run in ``runs``, so their token caches (``.cache/``) go there too."""
    arguments = shlex.split(options)
    command = arguments.pop(0) if arguments[:1] == ["finetune-text"] else "train-text"
    # the commands run in ``runs``: a path given relative to here (``--from checkpoints/…``) must still resolve
    arguments = [str(Path(a).resolve()) if not a.startswith("-") and Path(a).exists() else a for a in arguments]
    checkpoint = runs / name
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(runs / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "training", command, "--data", str(split / "train"),
                        "--output", str(checkpoint), "--name", name, *arguments],
                       cwd=runs, env=environment, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - started
    scored = subprocess.run([sys.executable, "-m", "training", "evaluate", str(checkpoint), "--data",
                             str(split / "val"), "--json"], cwd=runs, env=environment, capture_output=True, text=True,
                            check=True)
    late = json.loads(scored.stdout)
    random_split = json.loads((checkpoint / "manifest.json").read_text())["metrics"]["validation"]
    return {"accuracy": late["accuracy"], "macro_f1": late["macro_f1"], "ece": late["ece"], "nll": late["nll"],
            "random_split_accuracy": random_split["accuracy"], "train_seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a 20 Newsgroups bydate training tree")
    parser.add_argument("--fraction", type=float, default=0.15, help="the latest share of each class held out")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="OPTIONS"',
                        help="a train-text recipe to score, or 'finetune-text …' (repeatable; default: the default recipe)")
    parser.add_argument("--work", type=Path, help="where the split and the runs go (default: a temporary folder)")
    parser.add_argument("--output", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--split-only", action="store_true", help="write WORK/split/{train,val} and stop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variants = dict(item.split("=", 1) if "=" in item else (item, "") for item in args.variant) or {"default": ""}
    work = (args.work or Path(tempfile.mkdtemp(prefix="temporal-split-"))).resolve()
    train_count, val_count = temporal_split(args.data, work / "split", args.fraction)
    logger.info("split: %d earlier posts to train on, %d later ones held out (%s)", train_count, val_count, work)
    if args.split_only:
        return 0
    results = {"reference: TF-IDF 1-2-grams + LinearSVC": {"accuracy": reference_accuracy(work / "split")}}
    logger.info("reference: %.4f", results["reference: TF-IDF 1-2-grams + LinearSVC"]["accuracy"])
    for name, options in variants.items():
        results[name] = run_variant(work / "split", work, name, options)
        logger.info("%s: %s", name, json.dumps({key: round(value, 4) for key, value in results[name].items()}))
    lines = [f"Temporal split of `{args.data}`: the latest {args.fraction:.0%} of each class held out "
             f"({train_count} earlier posts to train on, {val_count} later ones to score).", "",
             "| recipe | training options | later posts: accuracy | macro-F1 | ECE | NLL | its own random validation split |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, metrics in results.items():
        if "macro_f1" not in metrics:
            lines.append(f"| {name} | — | {metrics['accuracy']:.2%} | — | — | — | — |")
            continue
        lines.append(f"| {name} | `{variants[name] or '(defaults)'}` | {metrics['accuracy']:.2%} | "
                     f"{metrics['macro_f1']:.3f} | {metrics['ece']:.2%} | {metrics['nll']:.3f} | "
                     f"{metrics['random_split_accuracy']:.2%} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output is not None:
        args.output.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
