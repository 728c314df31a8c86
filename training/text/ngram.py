"""Fitting the ``ngram_bag`` model: tables from the training tokens, then a linear fit on its features.

The steps: (1) bigram table — every word bigram seen in at least ``bigram_min_df`` training posts;
(2) character n-gram table — scikit-learn ``char_wb``-style n-grams (``" word "`` padded, lengths
``char_min..char_max``) of every vocabulary word, kept when in at least ``char_min_df`` posts, the
``max_char_ngrams`` most frequent; (3) smooth IDF (as scikit-learn) over the training posts;
(4) the model's own ``features()`` for every post → a scipy CSR matrix → a linear SVM or
multinomial logistic regression (scikit-learn) → weights copied into the module. Because the
features come from the module itself, serving computes exactly what was fitted.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.text_encoding import pad_batch
from models.text_models import NgramBagClassifier, NgramBagConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class NgramOptions:
    bigram_min_df: int = 2
    char_min: int = 2
    char_max: int = 5
    char_min_df: int = 2
    max_char_ngrams: int = 300_000  # 0: no character n-grams
    classifier: str = "svm"  # svm (LinearSVC, squared hinge) | logreg (multinomial)
    weight_dtype: str = "float32"  # float16 halves the checkpoint
    C: float = 1.0
    batch_size: int = 512
    class_weight: str | None = None  # "balanced": classes weighted inversely to their size


def char_ngrams(word: str, low: int, high: int) -> list[str]:
    """scikit-learn's ``char_wb`` n-grams of one word (a word shorter than n counts once)."""
    padded = f" {word} "
    grams = []
    for n in range(low, high + 1):
        offset = 0
        grams.append(padded[offset:offset + n])
        while offset + n < len(padded):
            offset += 1
            grams.append(padded[offset:offset + n])
        if offset == 0:
            break
    return grams


def _batches(id_lists: Sequence[Sequence[int]], batch_size: int, max_tokens: int):  # type: ignore[no-untyped-def]
    for start in range(0, len(id_lists), batch_size):
        yield start, pad_batch(id_lists[start:start + batch_size], max_tokens)


def feature_matrix(model: NgramBagClassifier, id_lists: Sequence[Sequence[int]], batch_size: int = 512) -> Any:
    """The model's features of every post as a scipy CSR matrix (posts × features)."""
    from scipy import sparse

    rows, cols, values = [], [], []
    with torch.inference_mode():
        for start, batch in _batches(id_lists, batch_size, model.config.max_tokens):
            r, c, v = model.features(batch)
            rows.append((r + start).numpy())
            cols.append(c.numpy())
            values.append(v.numpy())
    shape = (len(id_lists), model.config.num_features)
    return sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=shape)


def _document_frequency(matrix: Any) -> np.ndarray:
    return np.bincount(matrix.indices, minlength=matrix.shape[1])


def _bigram_keys(id_lists: Sequence[Sequence[int]], vocab_size: int, min_df: int) -> torch.Tensor:
    df: dict[int, int] = {}
    for ids in id_lists:
        for key in {a * vocab_size + b for a, b in itertools.pairwise(ids) if a and b}:
            df[key] = df.get(key, 0) + 1
    return torch.tensor(sorted(k for k, count in df.items() if count >= min_df), dtype=torch.long)


def _char_table(itos: Sequence[str], options: NgramOptions, skip_prefixes: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    grams: dict[str, int] = {}
    per_word: list[list[int]] = []
    for index, word in enumerate(itos):
        if index < 2 or any(word.startswith(p) for p in skip_prefixes):  # <pad>, <unk>, header tags
            per_word.append([])
            continue
        per_word.append(sorted({grams.setdefault(g, len(grams)) for g in char_ngrams(word, options.char_min, options.char_max)}))
    return list(grams), per_word


def _csr(per_word: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(ids) for ids in per_word], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    flat = torch.tensor([i for ids in per_word for i in ids], dtype=torch.int32)
    return offsets, flat


def build_ngram_model(
    id_lists: Sequence[Sequence[int]], itos: Sequence[str], num_classes: int, options: NgramOptions,
    max_tokens: int, skip_prefixes: Sequence[str] = (),
) -> NgramBagClassifier:
    """An unfitted model whose tables and IDF come from the training posts ``id_lists``."""
    vocab_size = len(itos)
    started = time.perf_counter()
    keys = _bigram_keys(id_lists, vocab_size, options.bigram_min_df)
    char_offsets = char_ids = None
    num_char = 0
    if options.max_char_ngrams > 0:
        grams, per_word = _char_table(itos, options, skip_prefixes)
        offsets, flat = _csr(per_word)
        probe = NgramBagClassifier(NgramBagConfig(vocab_size, num_classes, 0, len(grams), len(flat), max_tokens=max_tokens))
        probe.char_offsets.copy_(offsets)
        probe.char_ids.copy_(flat)
        df = _document_frequency(feature_matrix(probe, id_lists, options.batch_size))[vocab_size:]
        ranked = [g for g in np.argsort(-df, kind="stable") if df[g] >= options.char_min_df][: options.max_char_ngrams]
        remap = {int(old): new for new, old in enumerate(ranked)}
        per_word = [[remap[g] for g in ids if g in remap] for ids in per_word]
        char_offsets, char_ids = _csr(per_word)
        num_char = len(ranked)
    config = NgramBagConfig(vocab_size, num_classes, len(keys), num_char, 0 if char_ids is None else len(char_ids),
                            max_tokens=max_tokens, weight_dtype=options.weight_dtype)
    model = NgramBagClassifier(config)
    model.bigram_keys.copy_(keys)
    if char_offsets is not None and char_ids is not None:
        model.char_offsets.copy_(char_offsets)
        model.char_ids.copy_(char_ids)
    df = _document_frequency(feature_matrix(model, id_lists, options.batch_size))
    posts = len(id_lists)
    model.idf.copy_(torch.from_numpy(np.log((1 + posts) / (1 + df)) + 1.0).float())
    logger.info("ngram_bag tables: %d words, %d bigrams, %d char n-grams (%.1f s)", vocab_size, len(keys), num_char,
                time.perf_counter() - started)
    return model


def fit_ngram_model(model: NgramBagClassifier, id_lists: Sequence[Sequence[int]], labels: torch.Tensor,
                    options: NgramOptions, seed: int = 0) -> dict[str, float]:
    """Fit the linear layer on the model's features (scikit-learn), in place."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    started = time.perf_counter()
    matrix = feature_matrix(model, id_lists, options.batch_size)
    y = labels.numpy()
    classifier: Any
    if options.classifier == "svm":
        classifier = LinearSVC(C=options.C, class_weight=options.class_weight, random_state=seed)
    elif options.classifier == "logreg":
        classifier = LogisticRegression(C=options.C, class_weight=options.class_weight, max_iter=1000, random_state=seed)
    else:
        raise ValueError(f"unknown classifier {options.classifier!r} (svm or logreg)")
    classifier.fit(matrix, y)
    coef = np.asarray(classifier.coef_, dtype=np.float32)  # (classes, features)
    intercept = np.asarray(classifier.intercept_, dtype=np.float32)
    if coef.shape[0] == 1:  # two classes: scikit-learn keeps one row for the positive class
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(coef.T.copy()).to(model.weight.dtype))
        model.bias.copy_(torch.from_numpy(intercept))
    seconds = time.perf_counter() - started
    logger.info("fitted %s (C=%g) on %d posts × %d features in %.1f s", options.classifier, options.C,
                matrix.shape[0], matrix.shape[1], seconds)
    return {"fit_seconds": seconds, "nonzero_features": float(math.fsum(matrix.getnnz(axis=0) > 0))}
