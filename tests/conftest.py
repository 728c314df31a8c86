"""Fixtures shared by every test package: small real subsets of the shared data sets."""

from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def extract_cifar_subset(destination: Path, per_class: int) -> Path:
    """Extract the first ``per_class`` JPEGs of every class of the shared CIFAR-10 training split."""
    archive = SHARED_DATA / "cifar10-jpeg-train.tar.gz"
    if not archive.is_file():
        pytest.skip(f"shared data missing: {archive}")
    taken: dict[str, int] = defaultdict(int)
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or taken[parts[-2]] >= per_class:
                continue
            taken[parts[-2]] += 1
            target = destination / parts[-2] / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
            if len(taken) == 10 and all(count >= per_class for count in taken.values()):
                break
    return destination


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real CIFAR-10 training JPEGs per class, in ImageFolder layout."""
    return extract_cifar_subset(tmp_path_factory.mktemp("cifar") / "train", per_class=60)
