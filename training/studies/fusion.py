"""``fusion-study``: which modality and which fusion helps, and does transfer help — measured, not assumed.

Arms: image only, text only, late fusion, joint fusion; each with encoders transferred from the
project's checkpoints and from scratch; ``seeds`` seeds each; accuracy and macro-F1 (mean ± std)
on the shared validation split (20%, stratified, split seed fixed), beside a TF-IDF + linear SVM
text reference and the majority class. Writes ``results.json``, ``table.md`` and ``plot.png``.

* image / text / late share one late-fusion model per (initialisation, seed): "image only" trains
  and evaluates its head with every text absent, "text only" with every image absent.
* transferred: the fastconv CIFAR-10 encoder (frozen) and the text checkpoint's vocabulary and
  frozen topic model; scratch: a randomly initialised fastconv (frozen: random features, whitened
  on the training photos) and a vocabulary from the training texts only. The text bag is fitted
  on the training texts in both.
* with ``sentence_from``, a third initialisation of the late arms, "transferred + MiniLM": the
  transferred encoders plus the frozen pretrained sentence encoder and its scorer on the text side
  (the shipped recipe); the pretrained encoder is not the project's own, so it gets its own rows.
* joint: the trunk trained end to end for ``JOINT_EPOCHS`` (the study's budget; ``finetune-fusion``
  trains longer); transferred starts from the image trunk checkpoint (image adapter + trunk) and,
  when the text checkpoint is a ``trunk``, its text adapter; an n-gram text checkpoint has nothing
  the adapter can use, so the text side of both joint arms starts from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from models.text_encoding import tokenize
from training.engine.common import pick_device
from training.engine.metrics import classification_metrics
from training.fusion.data import load_pairs
from training.fusion.joint import build_joint, train_joint
from training.fusion.late import build_late, train_late_head
from training.fusion.prep import LATE_IMAGE_SIZE, SENTENCE_C, FusionOptions, prepare
from training.fusion.sentence import SentenceSource, load_sentence_source
from training.fusion.stacking import ScorerOptions
from training.fusion.task import tfidf_svm_reference
from training.fusion.text import tweet_preprocessing
from training.fusion.transfer import Parent, TextParent, load_image_parent, load_text_parent
from training.image.data import write_json

logger = logging.getLogger(__name__)

ARMS = ("image", "text", "late", "joint")
# the trunk trains end to end: ~2 min an epoch on 2 busy cores; 6 joint runs took 28 of the full study's 38 minutes
JOINT_EPOCHS = 2
LATE_ARMS = {"image": ("image",), "text": ("text",), "late": ("image", "text")}
SENTENCE_INIT = "transferred + MiniLM"


@dataclasses.dataclass
class StudyOptions:
    data: Path
    output: Path
    image_from: Path
    text_from: Path
    joint_image_from: Path | None = None
    seeds: int = 3
    quick: bool = False
    limit: int | None = None
    device: str = "auto"
    arms: tuple[str, ...] | None = None
    sentence_from: str | None = None  # adds the "transferred + MiniLM" late arms


def _score(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float]:
    metrics = classification_metrics(logits, labels, classes)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def _summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_fusion_study(options: StudyOptions) -> dict[str, Any]:
    arms = options.arms or ARMS
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown study arms {unknown}; choose from {list(ARMS)}")
    if options.seeds < 1:
        raise ValueError("--seeds must be ≥ 1")
    started = time.perf_counter()
    device = pick_device(options.device)
    late_size = LATE_IMAGE_SIZE
    base = FusionOptions(data=options.data, limit=options.limit or (300 if options.quick else None),
                         image_size=late_size, loop={"epochs": 3} if options.quick else {},
                         text_scorer=ScorerOptions(C=1.0, folds=2 if options.quick else 5),
                         image_scorer=ScorerOptions(C=0.01, folds=2 if options.quick else 5),
                         sentence_scorer=ScorerOptions(C=SENTENCE_C, folds=2 if options.quick else 5))
    image_parent = load_image_parent(options.image_from, ("fastconv",))
    text_parent = load_text_parent(options.text_from)
    joint_parent = load_image_parent(options.joint_image_from, ("trunk",)) if options.joint_image_from else None
    data = load_pairs(options.data, late_size)
    token_cache: dict[str, list[list[str]]] = {}

    def tokens_for(parent_pre: Any) -> list[list[str]]:
        preprocessing = tweet_preprocessing(parent_pre, base.bag.max_tokens)
        key = preprocessing.cache_key()
        if key not in token_cache:
            token_cache[key] = tokenize(data.texts, preprocessing)
        return token_cache[key]

    rows: list[dict[str, Any]] = []
    reference: dict[str, float] | None = None
    majority = 0.0
    sentence = load_sentence_source(options.sentence_from) if options.sentence_from else None
    inits: dict[str, tuple[Parent | None, TextParent | None, SentenceSource | None]] = {
        "transferred": (image_parent, text_parent, None), "scratch": (None, None, None)}
    if sentence is not None:
        inits[SENTENCE_INIT] = (image_parent, text_parent, sentence)
    late_arms = [arm for arm in arms if arm in LATE_ARMS]
    if late_arms:
        for init, (image, text, pretrained) in inits.items():
            late_options = dataclasses.replace(base, arch="late")
            prep = prepare(late_options, image, text, data=data,
                           token_lists=tokens_for(text.encoder.preprocessing if text else None), sentence=pretrained)
            if reference is None:
                reference = tfidf_svm_reference(prep)
                labels = prep.data.labels[prep.val_idx]
                majority = float(torch.bincount(labels).max() / len(labels))
            for seed in range(options.seeds):
                encoded = build_late(prep, late_options, seed)
                for arm in late_arms:
                    arm_options = dataclasses.replace(late_options, modalities=LATE_ARMS[arm])
                    _, logits = train_late_head(encoded, prep, arm_options, seed, torch.device("cpu"))
                    rows.append({"arm": arm, "init": init, "seed": seed,
                                 **_score(logits["fused"], prep.data.labels[prep.val_idx], prep.data.classes)})
                    logger.info("study %s", json.dumps(rows[-1]))
    if "joint" in arms:
        joint_data = load_pairs(options.data, 32)
        joint_inits = {"transferred": (joint_parent, text_parent), "scratch": (None, None)}
        for init, (image, text) in joint_inits.items():
            if init == "transferred" and image is None:
                logger.warning("no --joint-image-from: skipping the transferred joint arm")
                continue
            joint_options = dataclasses.replace(base, arch="joint", image_size=32,
                                                loop={"epochs": 1 if options.quick else JOINT_EPOCHS})
            prep = prepare(joint_options, image, text, data=joint_data,
                           token_lists=tokens_for(text.encoder.preprocessing if text else None))
            for seed in range(options.seeds):
                model, _ = build_joint(prep, seed)
                _, logits = train_joint(model, prep, joint_options, seed, device)
                rows.append({"arm": "joint", "init": init, "seed": seed,
                             **_score(logits["fused"], prep.data.labels[prep.val_idx], prep.data.classes)})
                logger.info("study %s", json.dumps(rows[-1]))
    result = {"rows": rows, "reference_tfidf_svm": reference, "majority_accuracy": majority,
              "seconds": time.perf_counter() - started, "quick": options.quick, "seeds": options.seeds,
              "late_image_size": late_size}
    write_study(options.output, result)
    return result


def _table(result: dict[str, Any]) -> str:
    lines = ["| arm | encoders | accuracy | macro-F1 | seeds |", "| --- | --- | --- | --- | --- |"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        groups.setdefault((row["arm"], row["init"]), []).append(row)
    for (arm, init), members in groups.items():
        accuracy = _summary([r["accuracy"] for r in members])
        f1 = _summary([r["macro_f1"] for r in members])
        lines.append(f"| {arm} | {init} | {accuracy[0]:.3f} ± {accuracy[1]:.3f} | {f1[0]:.3f} ± {f1[1]:.3f} | {len(members)} |")
    if result.get("reference_tfidf_svm"):
        ref = result["reference_tfidf_svm"]
        lines.append(f"| TF-IDF + linear SVM (text) | — | {ref['accuracy']:.3f} | {ref['macro_f1']:.3f} | 1 |")
    lines.append(f"| always the majority class | — | {result['majority_accuracy']:.3f} | — | — |")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in result["rows"])]
    inits = [init for init in ("transferred", SENTENCE_INIT, "scratch") if any(r["init"] == init for r in result["rows"])]
    width = 0.8 / len(inits)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("accuracy", "macro_f1"), strict=True):
        for slot, init in enumerate(inits):
            offset = (slot - (len(inits) - 1) / 2) * width
            means, stds, positions = [], [], []
            for index, arm in enumerate(arms):
                values = [r[metric] for r in result["rows"] if r["arm"] == arm and r["init"] == init]
                if values:
                    mean, std = _summary(values)
                    means.append(mean)
                    stds.append(std)
                    positions.append(index + offset)
            axis.bar(positions, means, width=width * 0.95, yerr=stds, capsize=3, label=init)
        if result.get("reference_tfidf_svm"):
            axis.axhline(result["reference_tfidf_svm"][metric], color="black", linestyle="--", label="TF-IDF + SVM (text)")
        if metric == "accuracy":
            axis.axhline(result["majority_accuracy"], color="grey", linestyle=":", label="majority class")
        axis.set_xticks(range(len(arms)), arms)
        axis.set_ylabel(metric.replace("_", "-"))
        axis.set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="upper left", ncol=2)
    figure.suptitle("fusion study: validation split, mean ± std over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_study(output: Path, result: dict[str, Any]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "results.json", result)
    (output / "table.md").write_text(_table(result))
    _plot(result, output / "plot.png")
    logger.info("fusion study written to %s:\n%s", output, _table(result))
