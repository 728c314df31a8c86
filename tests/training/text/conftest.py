"""Fixtures for the text training tests: a tiny fastconv checkpoint (a parent without a trunk)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fastconv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import build_model
    from models.checkpoint import new_manifest, save_checkpoint

    model = build_model("fastconv", {"num_classes": 10, "widths": [8, 16, 16]})
    manifest = new_manifest("tiny-fastconv", "image", "fastconv", model.config,  # type: ignore[arg-type]
                            classes=[f"c{i}" for i in range(10)], preprocessing={"kind": "image", "size": 32})
    return save_checkpoint(tmp_path_factory.mktemp("image") / "tiny-fastconv", model, manifest)
