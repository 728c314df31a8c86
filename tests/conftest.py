"""Fixtures shared by every test package: small real subsets of the shared data sets."""

from __future__ import annotations

from pathlib import Path

import pytest
from datakit import extract_cifar_subset, extract_news_subset, extract_pairs_subset


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real CIFAR-10 training JPEGs per class, in ImageFolder layout."""
    return extract_cifar_subset(tmp_path_factory.mktemp("cifar") / "train", per_class=60)


@pytest.fixture(scope="session")
def news_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 real posts from each of 4 newsgroups, bydate layout (folder per class, raw latin-1)."""
    return extract_news_subset(tmp_path_factory.mktemp("news") / "train", per_class=80)


@pytest.fixture(scope="session")
def pairs_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 real image + tweet pairs in the shared layout (train.jsonl + images/)."""
    return extract_pairs_subset(tmp_path_factory.mktemp("pairs") / "mvsa", 600)
