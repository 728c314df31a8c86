"""Fixtures for the text tests: a small real 20 Newsgroups subset and a tiny image trunk checkpoint."""

from __future__ import annotations

import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

NEWS_CLASSES = ("comp.graphics", "rec.sport.hockey", "sci.space", "talk.religion.misc")


def extract_news_subset(destination: Path, per_class: int, classes: tuple[str, ...] = NEWS_CLASSES) -> Path:
    """The first ``per_class`` posts of each of ``classes`` from the shared bydate training archive."""
    archive = SHARED_DATA / "20news-bydate-train.tar.gz"
    if not archive.is_file():
        pytest.skip(f"shared data missing: {archive}")
    taken: dict[str, int] = defaultdict(int)
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-2] not in classes or taken[parts[-2]] >= per_class:
                continue
            taken[parts[-2]] += 1
            target = destination / parts[-2] / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
            if len(taken) == len(classes) and all(count >= per_class for count in taken.values()):
                break
    return destination


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Token caches of the text tests go to a temporary folder, never the repository's ``.cache``."""
    from training import text_data

    folder = tmp_path_factory.mktemp("text-tokens")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text_data, "DEFAULT_TOKEN_CACHE", folder)
        yield folder


@pytest.fixture(scope="session")
def news_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 real posts from each of 4 newsgroups, bydate layout (folder per class, raw latin-1)."""
    return extract_news_subset(tmp_path_factory.mktemp("news") / "train", per_class=80)


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


@pytest.fixture(scope="session")
def fastconv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import build_model
    from models.checkpoint import new_manifest, save_checkpoint

    model = build_model("fastconv", {"num_classes": 10, "widths": [8, 16, 16]})
    manifest = new_manifest("tiny-fastconv", "image", "fastconv", model.config,  # type: ignore[arg-type]
                            classes=[f"c{i}" for i in range(10)], preprocessing={"kind": "image", "size": 32})
    return save_checkpoint(tmp_path_factory.mktemp("image") / "tiny-fastconv", model, manifest)
