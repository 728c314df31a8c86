"""Initialising fusion models from the project's pretrained checkpoints, and recording the lineage.

* Late fusion: the ``fastconv`` image checkpoint's stem and conv groups are copied into the image
  encoder (its head is not used); the ``ngram_bag`` text checkpoint is copied whole into the frozen
  ``topic`` branch, and its vocabulary and tokenisation settings start the fusion vocabulary.
* Joint fusion: an image ``trunk`` checkpoint gives the image adapter and the shared trunk; a text
  ``trunk`` checkpoint gives the text adapter (embedding rows of the tokens both vocabularies share,
  positions) and its vocabulary. Other text checkpoints have nothing the adapter can use and are
  set aside by ``training.fusion.prep.prepare``.

Every copy is by tensor name and checked for shape; a checkpoint of the wrong task or architecture
is a clear ``TransferError``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import Manifest, load_state_dict
from models.fusion import JointFusionClassifier, LateFusionClassifier
from models.text_encoding import TextEncoder, load_text_encoder
from models.trunk import TextAdapter, copy_trunk
from training.engine.common import lineage


class TransferError(ValueError):
    """A parent checkpoint that cannot initialise this fusion model."""


@dataclasses.dataclass
class Parent:
    path: Path
    manifest: Manifest
    state: dict[str, torch.Tensor]

    def lineage(self) -> dict[str, Any]:
        record = lineage(self.path)
        assert record is not None
        return record


@dataclasses.dataclass
class TextParent(Parent):
    encoder: TextEncoder


def load_image_parent(path: Path, architectures: tuple[str, ...]) -> Parent:
    state, manifest = load_state_dict(path)
    if manifest.task != "image":
        raise TransferError(f"{path} is a {manifest.task} checkpoint; --image-from needs an image checkpoint")
    if manifest.architecture not in architectures:
        raise TransferError(f"{path} is a {manifest.architecture!r} image checkpoint; this fusion model needs one of "
                            f"{list(architectures)}")
    return Parent(path, manifest, state)


def load_text_parent(path: Path) -> TextParent:
    state, manifest = load_state_dict(path)
    if manifest.task != "text":
        raise TransferError(f"{path} is a {manifest.task} checkpoint; --text-from needs a text checkpoint")
    return TextParent(path, manifest, state, load_text_encoder(path, manifest))


def _copy(target: nn.Module, source: dict[str, torch.Tensor], prefix_from: str, prefix_to: str, where: str,
          skip: tuple[str, ...] = ()) -> list[str]:
    """Copy ``prefix_from*`` tensors of ``source`` onto ``prefix_to*`` of ``target``; returns the target names."""
    own = target.state_dict()
    copied = []
    with torch.no_grad():
        for name, tensor in source.items():
            if not name.startswith(prefix_from) or name.startswith(skip):
                continue
            key = prefix_to + name[len(prefix_from):]
            if key not in own:
                raise TransferError(f"{where}: tensor {name} has no place ({key}) in this model")
            if own[key].shape != tensor.shape:
                raise TransferError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, this model needs "
                                    f"{tuple(own[key].shape)} at {key} (another width?)")
            own[key].copy_(tensor)
            copied.append(key)
    if not copied:
        raise TransferError(f"{where}: no '{prefix_from}*' tensors to copy")
    return copied


def init_late_image_encoder(model: LateFusionClassifier, parent: Parent) -> list[str]:
    """Copy the fastconv stem and conv groups (not the head) into the image encoder."""
    return _copy(model, parent.state, "", "image_encoder.", str(parent.path), skip=("head.",))


def init_late_topic(model: LateFusionClassifier, parent: TextParent) -> list[str]:
    """Copy the whole ngram_bag text model into the frozen topic branch."""
    if model.topic is None:
        raise TransferError("this late fusion model has no topic branch")
    return _copy(model, parent.state, "", "topic.", str(parent.path))


def init_joint(model: JointFusionClassifier, image: Parent | None, text: TextParent | None) -> list[str]:
    """Image adapter and trunk from an image trunk checkpoint; text adapter from a text trunk checkpoint."""
    copied: list[str] = []
    if image is not None:
        copied += ["trunk." + name for name in copy_trunk(model, image.state, str(image.path))]
        copied += _copy(model, image.state, "adapters.image.", "adapters.image.", str(image.path))
    if text is not None and text.manifest.architecture == "trunk":
        embedding = text.state.get("adapters.text.embedding.weight")
        positions = text.state.get("adapters.text.positions")
        if embedding is None or positions is None:
            raise TransferError(f"{text.path}: a trunk text checkpoint without a text adapter")
        own = model.adapters["text"]
        assert isinstance(own, TextAdapter)
        if embedding.shape[1] != own.embedding.weight.shape[1]:
            raise TransferError(f"{text.path}: text adapter width {embedding.shape[1]} ≠ trunk width "
                                f"{own.embedding.weight.shape[1]}")
        shared = min(len(embedding), len(own.embedding.weight))  # the fusion vocabulary extends the parent's
        tokens = min(positions.shape[1], own.positions.shape[1])
        with torch.no_grad():
            own.embedding.weight[:shared].copy_(embedding[:shared])
            own.positions[:, :tokens].copy_(positions[:, :tokens])
        copied += ["adapters.text.embedding.weight", "adapters.text.positions"]
    return copied
