"""Fixtures for every training test: token caches kept out of the repository, a tiny image trunk checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Token caches of the text tests go to a temporary folder, never the repository's ``.cache``."""
    from training.text import data as text_data

    folder = tmp_path_factory.mktemp("text-tokens")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text_data, "DEFAULT_TOKEN_CACHE", folder)
        yield folder


@pytest.fixture(scope="session")
def image_trunk_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny (untrained, seeded) image ``trunk`` checkpoint: dim 32, depth 2."""
    import torch

    from models import build_model
    from models.checkpoint import new_manifest, save_checkpoint

    torch.manual_seed(7)
    model = build_model("trunk", {"num_classes": 10, "dim": 32, "depth": 2, "heads": 2, "stem_width": 8})
    with torch.no_grad():  # make every trunk tensor distinctive (the class token starts at zeros)
        for parameter in model.trunk.parameters():  # type: ignore[union-attr]
            parameter.add_(torch.randn_like(parameter) * 0.1)
    manifest = new_manifest("tiny-image-trunk", "image", "trunk", model.config,  # type: ignore[arg-type]
                            classes=[f"c{i}" for i in range(10)],
                            preprocessing={"kind": "image", "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3})
    return save_checkpoint(tmp_path_factory.mktemp("image") / "tiny-trunk", model, manifest)
