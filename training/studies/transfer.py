"""``transfer-study``: does an image-pretrained trunk help text classification? Measured, not assumed.

Arms, all the same ``trunk`` text model (dims from the image checkpoint) on the same stratified
validation split (``split_seed`` 0):

* ``scratch`` — random initialisation;
* ``random-frozen`` — control: a random trunk, frozen except its LayerNorms (is it the image
  knowledge that helps, or only training the adapter and head on a fixed trunk?);
* ``image-frozen`` — trunk from the image checkpoint, frozen except its LayerNorms;
* ``image-finetuned`` — trunk from the image checkpoint, everything trained;
* ``previous-image-frozen`` — like ``image-frozen`` from a second image checkpoint
  (``--compare-from``, e.g. a weaker source), so the effect of the source shows beside it;
* ``tfidf-svm`` — reference: TF-IDF (word 1–2-grams, sublinear tf) + linear SVM (scikit-learn).

``--arms`` runs a subset and ``--grid ARM=V,V`` replaces an arm's grid (an affordable study on
longer posts tunes over fewer values). Budgets: 1%, 10%, 100% of the training labels (a stratified
subset chosen by the seed; the same subset for every arm). Tuning: at every (arm, budget) the
learning-rate grid of the arm (C grid for the SVM) runs with seed 0; the best value on validation
then runs the remaining seeds; the table reports mean ± std over seeds at that value (seed 0's
tuning run included, the same for every arm).
Every finished run is appended to ``runs.json`` so an interrupted study resumes where it stopped.
Outputs in the results folder: ``runs.json``, ``results.md`` (table) and ``transfer.png`` (plot).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from models.checkpoint import read_manifest
from training.engine.atomic import atomic_output
from training.text.data import load_text_data
from training.text.task import PreparedText, TextRunOptions, prepare_text_run, train_text_model, validation_logits

logger = logging.getLogger(__name__)

ARMS: dict[str, dict[str, Any]] = {
    # Earlier passes with lower grids picked the top value, so the grids were shifted up until the
    # best value was inside (or the arm was clearly beaten); those runs stay in runs.json.
    "scratch": {"image": False, "freeze": "none", "grid": (1e-3, 3e-3, 1e-2)},
    "random-frozen": {"image": False, "freeze": "trunk-except-norms", "grid": (1e-2, 3e-2, 1e-1, 3e-1)},
    "image-frozen": {"image": True, "freeze": "trunk-except-norms", "grid": (1e-2, 3e-2, 1e-1, 3e-1)},
    "image-finetuned": {"image": True, "freeze": "none", "grid": (1e-3, 3e-3, 1e-2)},
    "previous-image-frozen": {"image": "previous", "freeze": "trunk-except-norms", "grid": (1e-2, 3e-2, 1e-1, 3e-1)},
    "tfidf-svm": {"image": False, "freeze": "none", "grid": (0.3, 1.0, 3.0)},  # C, not a learning rate
}
NEURAL_ARMS = ("scratch", "random-frozen", "image-frozen", "image-finetuned", "previous-image-frozen")
TRUNK_SHAPE = ("dim", "depth", "heads", "mlp_ratio", "dropout")


@dataclasses.dataclass
class StudyOptions:
    image_checkpoint: Path
    data: Path
    output: Path
    compare_checkpoint: Path | None = None  # the source of ``previous-image-frozen``
    arms: tuple[str, ...] | None = None  # default: every arm (``previous-image-frozen`` with a compare checkpoint)
    grids: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)  # per-arm grid overrides
    quick: bool = False
    fractions: tuple[float, ...] | None = None
    seeds: tuple[int, ...] | None = None
    epochs: int | None = None  # fixed epochs per run; default: scaled to ``target_samples``
    max_tokens: int | None = None
    device: str = "auto"
    report_only: bool = False  # write the table and plot from the runs already in runs.json
    target_samples: int = 12_000  # examples seen per run (epochs = samples / labelled posts, clamped)
    min_epochs: int = 2
    max_epochs: int = 30
    batch_size: int = 32


def study_arms(options: StudyOptions) -> tuple[str, ...]:
    """The arms to run, in table order; refuses unknown names and a comparison without its source."""
    arms = options.arms or tuple(arm for arm in ARMS if arm != "previous-image-frozen" or options.compare_checkpoint)
    unknown = sorted(set(arms) - set(ARMS)) + sorted(set(options.grids) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if "previous-image-frozen" in arms and options.compare_checkpoint is None:
        raise ValueError("the previous-image-frozen arm needs --compare-from (the image checkpoint to compare with)")
    if options.compare_checkpoint is not None and "previous-image-frozen" not in arms:
        raise ValueError("--compare-from feeds only the previous-image-frozen arm, which --arms leaves out")
    ungridded = sorted(set(options.grids) - set(arms))
    if ungridded:
        raise ValueError(f"--grid for {', '.join(ungridded)}, which --arms leaves out")
    return tuple(arm for arm in ARMS if arm in arms)


def _settings(options: StudyOptions) -> dict[str, Any]:
    arms = study_arms(options)
    if options.quick:
        grids = {arm: options.grids.get(arm, ARMS[arm]["grid"][1:2]) for arm in arms}
        return {"fractions": options.fractions or (0.5, 1.0), "seeds": options.seeds or (0,),
                "max_tokens": options.max_tokens or 32, "grids": grids, "epochs": options.epochs or 1}
    return {"fractions": options.fractions or (0.01, 0.1, 1.0), "seeds": options.seeds or (0, 1, 2),
            "max_tokens": options.max_tokens or 64,
            "grids": {arm: options.grids.get(arm, ARMS[arm]["grid"]) for arm in arms}, "epochs": options.epochs}


def _epochs(options: StudyOptions, fixed: int | None, posts: int) -> int:
    if fixed is not None:
        return fixed
    return max(options.min_epochs, min(options.max_epochs, math.ceil(options.target_samples / max(posts, 1))))


def _tfidf_accuracy(prepared: PreparedText, c: float) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    texts = prepared.data.texts
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    train = vectorizer.fit_transform([texts[i] for i in prepared.train_index.tolist()])
    validation = vectorizer.transform([texts[i] for i in prepared.val_index.tolist()])
    classifier = LinearSVC(C=c).fit(train, prepared.train_labels.numpy())
    return float((classifier.predict(validation) == prepared.val_labels.numpy()).mean())


def _source(arm: str, options: StudyOptions) -> Path | None:
    """The image checkpoint whose trunk the arm starts from (None: a random trunk, or no trunk)."""
    image = ARMS[arm]["image"]
    if not image:
        return None
    return options.compare_checkpoint if image == "previous" else options.image_checkpoint


def _source_weights(arm: str, options: StudyOptions) -> str | None:
    """The weights hash of the arm's source: a run is reused only from the same source."""
    source = _source(arm, options)
    return None if source is None else read_manifest(source).weights_sha256


def _run_one(arm: str, value: float, fraction: float, seed: int, options: StudyOptions, settings: dict[str, Any],
             data: Any, source_weights: str | None) -> dict[str, Any]:
    spec = ARMS[arm]
    source = _source(arm, options)
    image_config = read_manifest(options.image_checkpoint).config
    run = TextRunOptions(
        data=options.data, architecture="trunk", preprocessing={"max_tokens": settings["max_tokens"]},
        model_config={} if spec["image"] else {k: image_config[k] for k in TRUNK_SHAPE if k in image_config},
        seed=seed, device=options.device, parent=source,
        freeze=spec["freeze"], label_fraction=fraction, batch_size=options.batch_size,
    )
    prepared = prepare_text_run(run, data=data)
    started = time.perf_counter()
    if arm == "tfidf-svm":
        accuracy = _tfidf_accuracy(prepared, value)
        epochs = 0
    else:
        epochs = _epochs(options, settings["epochs"], len(prepared.train_ids))
        run.loop = {"lr": value, "epochs": epochs}
        model, _, _ = train_text_model(run, prepared, validate_each_epoch=False)
        logits = validation_logits(model, prepared, options.device)
        accuracy = float((logits.argmax(dim=1) == prepared.val_labels).float().mean())
    return {"arm": arm, "value": value, "fraction": fraction, "seed": seed, "accuracy": accuracy, "epochs": epochs,
            "train_posts": len(prepared.train_ids), "seconds": time.perf_counter() - started,
            "source": source_weights}


def _key(arm: str, value: float, fraction: float, seed: int, source: str | None) -> str:
    return f"{arm}|{value:g}|{fraction:g}|{seed}|{source or '-'}"


def run_transfer_study(options: StudyOptions) -> dict[str, Any]:
    settings = _settings(options)
    options.output.mkdir(parents=True, exist_ok=True)
    runs_path = options.output / "runs.json"
    runs: dict[str, dict[str, Any]] = {}
    if runs_path.is_file():
        runs = {_key(r["arm"], r["value"], r["fraction"], r["seed"], r.get("source")): r
                for r in json.loads(runs_path.read_text())}
        logger.info("resuming: %d runs already in %s", len(runs), runs_path)
    data = None if options.report_only else load_text_data(options.data)
    started = time.perf_counter()
    sources = {arm: _source_weights(arm, options) for arm in settings["grids"]}  # runs of another source are not reused

    def record(arm: str, value: float, fraction: float, seed: int) -> dict[str, Any]:
        key = _key(arm, value, fraction, seed, sources[arm])
        if key not in runs:
            runs[key] = _run_one(arm, value, fraction, seed, options, settings, data, sources[arm])
            logger.info("%s: accuracy %.4f (%.0f s)", key, runs[key]["accuracy"], runs[key]["seconds"])
            with atomic_output(runs_path) as handle:  # a killed study keeps every run it finished
                handle.write(json.dumps(list(runs.values()), indent=1).encode())
        return runs[key]

    cells: list[dict[str, Any]] = []
    seeds = settings["seeds"]
    for fraction in settings["fractions"]:
        for arm in settings["grids"]:
            grid = settings["grids"][arm]
            if options.report_only:  # what has been measured so far, nothing new
                tuning = [runs[k] for k in (_key(arm, v, fraction, seeds[0], sources[arm]) for v in grid) if k in runs]
            else:
                tuning = [record(arm, value, fraction, seeds[0]) for value in grid]
            if not tuning:
                continue
            best = max(tuning, key=lambda r: r["accuracy"])["value"]
            if options.report_only:
                keys = (_key(arm, best, fraction, seed, sources[arm]) for seed in seeds)
                scores = [runs[k]["accuracy"] for k in keys if k in runs]
            else:
                scores = [record(arm, best, fraction, seed)["accuracy"] for seed in seeds]
            cells.append({"arm": arm, "fraction": fraction, "best_value": best, "accuracies": scores,
                          "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                          "grid": {f"{r['value']:g}": r["accuracy"] for r in tuning},
                          "complete": len(tuning) == len(grid) and len(scores) == len(seeds)})
    summary = {"settings": {**{k: v for k, v in settings.items() if k != "grids"},
                            "grids": {k: list(v) for k, v in settings["grids"].items()},
                            "image_checkpoint": str(options.image_checkpoint),
                            "compare_checkpoint": str(options.compare_checkpoint) if options.compare_checkpoint else None,
                            "data": str(options.data)},
               "cells": cells, "seconds": time.perf_counter() - started}
    (options.output / "summary.json").write_text(json.dumps(summary, indent=2))
    (options.output / "results.md").write_text(results_table(cells, settings))
    plot_study(cells, options.output / "transfer.png")
    return {"results": str(options.output / "results.md"), "plot": str(options.output / "transfer.png"),
            "runs": len(runs), "seconds": summary["seconds"]}


def results_table(cells: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    fractions = sorted({c["fraction"] for c in cells})
    header = "| arm | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |"
    lines = [header, "|---" * (len(fractions) + 1) + "|"]
    for arm in settings["grids"]:
        row = [f"`{arm}`"]
        for fraction in fractions:
            cell = next((c for c in cells if c["arm"] == arm and c["fraction"] == fraction), None)
            if cell is None:
                row.append("not run")
                continue
            knob = "C" if arm == "tfidf-svm" else "lr"
            partial = "" if cell.get("complete", True) else (
                f"; partial: {len(cell['grid'])}/{len(settings['grids'][arm])} of the grid, {len(cell['accuracies'])} seed(s)")
            row.append(f"{cell['mean']:.3f} ± {cell['std']:.3f} ({knob} {cell['best_value']:g}{partial})")
        lines.append("| " + " | ".join(row) + " |")
    seeds = ", ".join(str(s) for s in settings["seeds"])
    notes = (f"\nValidation accuracy, mean ± std over seeds {seeds} ({settings['max_tokens']} tokens per post). "
             "The learning rate (C for the SVM) was picked per arm and budget from its grid with seed 0.\n")
    return "\n".join(lines) + "\n" + notes


def plot_study(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        rows = sorted((c for c in cells if c["arm"] == arm), key=lambda c: c["fraction"])
        if not rows:
            continue
        axes.errorbar([c["fraction"] * 100 for c in rows], [c["mean"] for c in rows], yerr=[c["std"] for c in rows],
                      marker="o", capsize=3, label=arm, linestyle="--" if arm == "tfidf-svm" else "-")
    axes.set_xscale("log")
    axes.set_xlabel("labelled training posts (%)")
    axes.set_ylabel("validation accuracy")
    axes.set_title("Text from an image-pretrained trunk vs scratch")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
