"""Every registered architecture: a forward pass on a small batch, and a checkpoint round trip.

Parametrized over the registry (as timm's tests are over ``list_models()``), so a newly registered
model is tested without editing this file: it is built from its entry in ``TINY_CONFIGS`` (its
defaults if it has none) with ``num_classes``, and fed the inputs its ``forward`` takes (``images``,
``token_ids``), restricted to the modalities its config declares, if it declares any.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import models  # noqa: F401  (registers every architecture)
from models import build_model
from models.checkpoint import load_checkpoint, new_manifest, save_checkpoint
from models.preprocessing import ImagePreprocessing
from models.registry import available_models, get_model_spec
from models.text_encoding import TextPreprocessing

BATCH = 3
CLASSES = 5
VOCAB = 50  # token ids are drawn below this
TINY_TRUNK = {"dim": 32, "depth": 1, "heads": 2, "patch_size": 8, "stem_width": 8}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "fastconv": {"widths": [8, 16, 16]},
    "trunk": TINY_TRUNK,
    "bilstm": {"vocab_size": VOCAB, "embedding_dim": 8, "hidden_size": 6},
    "ngram_bag": {"vocab_size": VOCAB},
    "fusion_late": {"image": {"widths": [8, 16, 16]}, "text": {"vocab_size": VOCAB, "num_classes": 3, "max_tokens": 16}},
    "fusion_joint": {**TINY_TRUNK, "vocab_size": VOCAB, "max_text_tokens": 16},
    "image_ensemble": {"member_config": {"num_classes": CLASSES, "widths": [8, 16, 16]}},
}
INPUTS = {"images": "image", "token_ids": "text"}  # forward's argument → the modality it carries


def _build(name: str) -> nn.Module:
    fields = {field.name for field in dataclasses.fields(get_model_spec(name).config_cls)}
    config = {**({"num_classes": CLASSES} if "num_classes" in fields else {}), **TINY_CONFIGS.get(name, {})}
    torch.manual_seed(0)
    model = build_model(name, config)
    with torch.no_grad():  # weights unlike any fresh initialisation, so a round trip that loads nothing fails
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    config: Any = getattr(model, "config", None)
    declared = set(getattr(config, "modalities", INPUTS.values()))
    generator = torch.Generator().manual_seed(1)
    size = int(getattr(config, "image_size", 32))
    inputs: dict[str, torch.Tensor] = {}
    for argument, parameter in inspect.signature(model.forward).parameters.items():
        if argument in INPUTS and INPUTS[argument] in declared:
            if argument == "images":
                inputs[argument] = torch.randn(BATCH, 3, size, size, generator=generator)  # (B, 3, S, S)
            else:
                ids = torch.randint(2, VOCAB, (BATCH, 12), generator=generator)  # (B, T)
                ids[1, 7:] = 0  # a shorter text, right-padded
                inputs[argument] = ids
        elif parameter.default is inspect.Parameter.empty:
            pytest.fail(f"{type(model).__name__}.forward needs {argument!r}: teach this test what to pass")
    assert inputs, f"{type(model).__name__} reads none of {sorted(INPUTS)}"
    return inputs


def _task(inputs: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    image = ImagePreprocessing(32, (0.5,) * 3, (0.25,) * 3).to_dict()
    text = TextPreprocessing().to_dict()
    if set(inputs) == {"images"}:
        return "image", image
    if set(inputs) == {"token_ids"}:
        return "text", text
    return "multimodal", {"kind": "multimodal", "image": image, "text": text}


@pytest.mark.parametrize("name", available_models())
def test_forward_maps_a_small_batch_to_finite_logits(name: str) -> None:
    model = _build(name)
    inputs = _inputs(model)
    with torch.inference_mode():
        logits = model(**inputs)
        again = model(**inputs)
    assert logits.shape == (BATCH, CLASSES) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, again)  # eval mode: no dropout, no randomness


@pytest.mark.parametrize("name", available_models())
def test_a_saved_checkpoint_loads_back_with_identical_outputs(name: str, tmp_path: Path) -> None:
    model = _build(name)
    inputs = _inputs(model)
    task, preprocessing = _task(inputs)
    manifest = new_manifest(name, task, name, model.config, classes=[f"c{i}" for i in range(CLASSES)],  # type: ignore[arg-type]
                            preprocessing=preprocessing)
    save_checkpoint(tmp_path / name, model, manifest)
    loaded = load_checkpoint(tmp_path / name)
    assert type(loaded.model) is type(model) and not loaded.model.training
    with torch.inference_mode():
        assert torch.equal(loaded.model(**inputs), model(**inputs))
