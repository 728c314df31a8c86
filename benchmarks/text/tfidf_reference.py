"""TF-IDF + linear SVM (scikit-learn) on the text validation split, side by side with a checkpoint.

Usage: ``python benchmarks/text/tfidf_reference.py --data /work/data/20news-bydate-train
[--checkpoint runs/text-default]``. Uses the same stratified split as ``train-text`` (10%, seed 0)
and prints the validation accuracy of the references (word 1–2-grams, plain and sublinear tf) and
the checkpoint's recorded validation metrics (those of its held-out fit, also with ``--refit-full``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training.text.data import load_text_data, stratified_split  # noqa: E402

logger = logging.getLogger("tfidf_reference")


def main() -> int:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_text_data(args.data)
    train, validation = stratified_split(data.labels, args.validation_fraction, 0)
    texts_train = [data.texts[i] for i in train.tolist()]
    texts_val = [data.texts[i] for i in validation.tolist()]
    results: dict[str, float] = {}
    for name, sublinear in (("tfidf_1-2gram_linearsvc", False), ("tfidf_1-2gram_sublinear_linearsvc", True)):
        started = time.perf_counter()
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=sublinear)
        classifier = LinearSVC().fit(vectorizer.fit_transform(texts_train), data.labels[train].numpy())
        predicted = classifier.predict(vectorizer.transform(texts_val))
        results[name] = float((predicted == data.labels[validation].numpy()).mean())
        logger.info("%-36s validation accuracy %.4f (%.0f s)", name, results[name], time.perf_counter() - started)
    if args.checkpoint is not None:
        manifest = json.loads((args.checkpoint / "manifest.json").read_text())
        validation_metrics = manifest["metrics"]["validation"]
        results["checkpoint"] = validation_metrics["accuracy"]
        logger.info("%-36s validation accuracy %.4f (recorded; ece after calibration %.4f)", args.checkpoint,
                    validation_metrics["accuracy"], validation_metrics["ece"])
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
