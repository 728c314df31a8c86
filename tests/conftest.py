"""Fixtures shared by every test package: small real subsets of the shared data sets."""

from __future__ import annotations

from pathlib import Path

import pytest
from datakit import extract_cifar_subset


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real CIFAR-10 training JPEGs per class, in ImageFolder layout."""
    return extract_cifar_subset(tmp_path_factory.mktemp("cifar") / "train", per_class=60)
