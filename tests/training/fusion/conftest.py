"""Fixtures for the fusion training tests: tiny parent checkpoints and a sentence-encoder source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sentencekit import write_sentence_source

from models import build_model
from models.checkpoint import new_manifest, save_checkpoint
from models.text_encoding import TextPreprocessing, Vocabulary, tokenize


@pytest.fixture(scope="session")
def fastconv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny (untrained, seeded, whitened) fastconv image checkpoint."""
    torch.manual_seed(11)
    model = build_model("fastconv", {"num_classes": 10, "widths": [8, 16, 16]})
    model.init_whitening(torch.randn(64, 3, 32, 32))  # type: ignore[operator]
    manifest = new_manifest("tiny-fastconv", "image", "fastconv", model.config, classes=[f"c{i}" for i in range(10)],
                            preprocessing={"kind": "image", "size": 32, "mean": [0.49, 0.48, 0.45],
                                           "std": [0.25, 0.24, 0.26], "color": "RGB", "resize": "bilinear"})
    return save_checkpoint(tmp_path_factory.mktemp("parents") / "fastconv", model, manifest)


@pytest.fixture(scope="session")
def trunk_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny (untrained, seeded) image trunk checkpoint."""
    torch.manual_seed(12)
    model = build_model("trunk", {"num_classes": 10, "dim": 32, "depth": 1, "heads": 2, "patch_size": 8,
                                  "stem_width": 8})
    manifest = new_manifest("tiny-trunk", "image", "trunk", model.config, classes=[f"c{i}" for i in range(10)],
                            preprocessing={"kind": "image", "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3})
    return save_checkpoint(tmp_path_factory.mktemp("parents") / "trunk", model, manifest)


@pytest.fixture(scope="session")
def ngram_text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ngram_bag text checkpoint (random weights) whose preprocessing tags headers, as 20NG's may."""
    from training.fusion.text import BagOptions, build_bag

    preprocessing = TextPreprocessing(header_fields=("subject",), max_tokens=256)
    texts = ["Subject: space shuttle\n\nthe launch was great", "graphics cards are slow today",
             "hockey game tonight was a great game", "religion and the shuttle launch"] * 3
    token_lists = tokenize(texts, preprocessing)
    vocabulary = Vocabulary.build(token_lists, min_freq=1)
    ids = [vocabulary.lookup(tokens) for tokens in token_lists]
    torch.manual_seed(13)
    bag = build_bag(ids, vocabulary, 4, BagOptions(bigram_min_df=1, char_min_df=1, max_tokens=256))
    with torch.no_grad():
        bag.weight.normal_()
        bag.bias.normal_()
    manifest = new_manifest("tiny-news", "text", "ngram_bag", bag.config, classes=["a", "b", "c", "d"],
                            preprocessing=preprocessing.to_dict())
    return save_checkpoint(tmp_path_factory.mktemp("parents") / "news", bag, manifest,
                           extra_files={"vocab.json": vocabulary.to_json_bytes()})


@pytest.fixture(scope="session")
def sentence_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random sentence encoder whose WordPiece vocabulary covers any English text (letters as pieces)."""
    import string

    letters = list(string.ascii_lowercase + string.digits)
    words = ["the", "love", "happy", "sad", "day", "rt", "http", "co", "##s", "##ing"]
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *(f"##{c}" for c in letters),
                  *string.punctuation]
    return write_sentence_source(tmp_path_factory.mktemp("sentence") / "tiny-minilm", vocabulary)
