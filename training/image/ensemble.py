"""``ensemble-image``: joins image checkpoints trained apart on one split into one calibrated model.

    python -m training ensemble-image runs/a runs/b --data DATA/train --output checkpoints/cifar10-fastconv

The members must be one recipe's runs on the same images with the same validation split (``pretrain-image
--seed N --split-seed S``): the ensemble is then scored and calibrated on images none of its members
trained on. Everything is checked before any image is decoded: a member trained on other data, on
another split, with other classes, preprocessing or architecture is refused with what differs. The
manifest names every member (name, version, weights hash) as its lineage and records each member's
accuracy beside the ensemble's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import Manifest, load_state_dict, new_manifest, read_manifest
from models.ensemble import MAX_MEMBERS, MEMBER_ARCHITECTURES, ImageEnsemble, ImageEnsembleConfig
from models.preprocessing import ImagePreprocessing
from training.engine.common import finish_checkpoint, lineage, pick_device
from training.engine.loop import predict_logits
from training.image.data import ImageDataset, load_image_folder, stratified_split
from training.image.task import evaluation_batches

logger = logging.getLogger(__name__)

# Test-time views per member: the image alone (more members for the same compute), with its mirror, or
# also the one-pixel shifts (three times the compute).
VIEWS = {"none": {"tta_flip": False, "tta_translate": False},
         "flip": {"tta_flip": True, "tta_translate": False},
         "flip-translate": {"tta_flip": True, "tta_translate": True}}


@dataclasses.dataclass(frozen=True)
class Split:
    fraction: float
    seed: int


def member_split(manifest: Manifest) -> Split:
    """The validation split a member was trained with. Manifests written before the split was recorded
    give it through the run's seed and its share of validation images (checked against the data by
    ``held_out``)."""
    validation = manifest.metrics.get("validation", {})
    if validation.get("refit_full") or validation.get("measured_on"):
        raise ValueError(f"{manifest.name} is a refit on every image: it has no validation split to share")
    recorded = validation.get("split")
    if recorded is not None:
        return Split(float(recorded["fraction"]), int(recorded["seed"]))
    try:
        held, trained = int(validation["validation_images"]), int(validation["train_images"])
        seed = int(validation["loop"]["seed"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{manifest.name}: its manifest does not say which validation split it was trained "
                         "with (a refit or a fine-tune has none to share)") from None
    if held == 0:
        raise ValueError(f"{manifest.name} trained on every image: it has no validation split to share")
    return Split(round(held / (held + trained), 4), seed)


def held_out(dataset: ImageDataset, manifests: list[Manifest], split: Split) -> ImageDataset:
    """The validation images the members share; refused unless there are as many as each member held out."""
    _, indices = stratified_split(dataset.labels, split.fraction, split.seed)
    for manifest in manifests:
        recorded = manifest.metrics.get("validation", {}).get("validation_images")
        if recorded is not None and recorded != len(indices):
            raise ValueError(f"{manifest.name} held out {recorded} images, the split gives {len(indices)}: it was "
                             "not trained with this split of this data (a --limit run?)")
    return dataset.subset(indices)


def _close(a: Any, b: Any) -> bool:
    """Equal, numbers within a relative 1e-5: two runs on the same images may fit their normalisation with
    reductions in another order (torch's threads), which moves the last digits."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, rel_tol=1e-5)
    return bool(a == b)


# Config keys that do not change the network a member computes: its test-time views (the ensemble sets
# them) and how its training initialised it (older manifests lack the key).
_NOT_COMPARED = ("tta_flip", "tta_translate", "identity_init")


def _comparable_config(manifest: Manifest) -> dict[str, Any]:
    return {key: value for key, value in manifest.config.items() if key not in _NOT_COMPARED}


def check_members(manifests: list[Manifest]) -> Split:
    """The split the members share; ``ValueError`` saying what differs when they cannot be one model."""
    if not 2 <= len(manifests) <= MAX_MEMBERS:
        raise ValueError(f"an ensemble needs 2 to {MAX_MEMBERS} members, got {len(manifests)}")
    first = manifests[0]
    if first.task != "image" or first.architecture not in MEMBER_ARCHITECTURES:
        raise ValueError(f"{first.name}: members must be image models of {', '.join(MEMBER_ARCHITECTURES)}, "
                         f"not {first.task} {first.architecture!r}")
    split = member_split(first)
    for other in manifests[1:]:
        differences = [what for what, same in (
            ("task and architecture", (other.task, other.architecture) == (first.task, first.architecture)),
            ("architecture config", _comparable_config(other) == _comparable_config(first)),
            ("classes", other.classes == first.classes),
            ("preprocessing", _close(other.preprocessing, first.preprocessing)),
            ("training data", other.data_fingerprint == first.data_fingerprint),
            ("validation split", member_split(other) == split),
        ) if not same]
        if differences:
            raise ValueError(f"{other.name} and {first.name} differ in {', '.join(differences)}: the members of one "
                             "ensemble are runs of one recipe on one split (pretrain-image --split-seed)")
    if len({manifest.weights_sha256 for manifest in manifests}) < len(manifests):
        raise ValueError("the same weights are named twice: members must be different runs (--seed)")
    return split


def build_ensemble(members: list[Path], manifests: list[Manifest], views: str) -> ImageEnsemble:
    """The ensemble module with every member's weights (the views where the architecture has them)."""
    member_config = {**manifests[0].config, **{key: value for key, value in VIEWS[views].items()
                                               if key in manifests[0].config}}
    model = ImageEnsemble(ImageEnsembleConfig(manifests[0].architecture, member_config, len(members)))
    for index, member in enumerate(members):
        state, _ = load_state_dict(member)
        model.members[index].load_state_dict(state)
    return model.eval()


def ensemble_image(members: list[Path], data: Path, output: Path, name: str | None = None, views: str = "flip",
                   device: str = "auto", command: str = "") -> dict[str, Any]:
    manifests = [read_manifest(member) for member in members]
    split = check_members(manifests)
    model = build_ensemble(members, manifests, views)
    preprocessing = ImagePreprocessing.from_manifest(manifests[0])
    dataset = load_image_folder(data, size=preprocessing.size)
    if dataset.fingerprint != manifests[0].data_fingerprint:
        raise ValueError(f"{data} is not the data the members were trained on (fingerprint "
                         f"{dataset.fingerprint[:12]}, theirs {manifests[0].data_fingerprint[:12]})")
    validation = held_out(dataset, manifests, split)
    labels = validation.labels
    torch_device = pick_device(device)
    model = model.to(torch_device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    member_logits = []
    for index, member in enumerate(model.members):
        logits, _ = predict_logits(member, evaluation_batches(validation, preprocessing), torch_device)
        member_logits.append(logits)
        logger.info("member %d (%s): %.2f%% of %d validation images", index, manifests[index].name,
                    100 * float((logits.argmax(1) == labels).float().mean()), len(labels))
    logits = torch.stack(member_logits).mean(dim=0)  # as ImageEnsemble.forward
    manifest = new_manifest(
        name or output.name, "image", "image_ensemble", model.config, classes=manifests[0].classes,
        preprocessing=dict(manifests[0].preprocessing), data_fingerprint=dataset.fingerprint,
        parent={"members": [lineage(member) for member in members]}, training_command=command,
    )
    extra = {
        "validation_images": len(validation), "split": dataclasses.asdict(split), "views": views,
        "device": str(torch_device), "members": [
            {"name": member.name, "accuracy": float((member_logit.argmax(1) == labels).float().mean()),
             "validation_accuracy_recorded": member.metrics.get("validation", {}).get("accuracy"),
             "train_seconds": member.metrics.get("validation", {}).get("train_seconds")}
            for member, member_logit in zip(manifests, member_logits, strict=True)],
    }
    return finish_checkpoint(output, model, manifest, logits, labels, history=[], extra_metrics=extra, top_label=True)
