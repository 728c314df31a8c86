"""The text side of late fusion: the fusion vocabulary, the n-gram bag's tables, and its fit.

* Preprocessing: the text checkpoint's settings (lowercasing, tokenizer, character cap) adapted to
  short posts: no header tagging or cleanup (a tweet has no headers), at most ``max_tokens`` tokens.
* Vocabulary: transferred — the text checkpoint's vocabulary, ids unchanged, with the tokens of the
  training texts it lacks appended (so the frozen topic model reads the same ids); scratch — built
  from the training texts alone.
* The bag's tables (word bigrams, ``char_wb``-style character n-grams of every vocabulary word,
  smooth IDF) come from the training texts, in the layout of ``models.text_models.NgramBagClassifier``.
* ``feature_matrix``: exactly the features the module computes, as a scipy CSR matrix, for the
  linear fit (``training.fusion.stacking``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.text_encoding import PAD, UNK, TextPreprocessing, Vocabulary, pad_batch
from models.text_models import NgramBagClassifier, NgramBagConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BagOptions:
    min_freq: int = 1  # new vocabulary tokens: seen at least this often in the training texts
    bigram_min_df: int = 2
    char_min: int = 2
    char_max: int = 5
    char_min_df: int = 2
    max_tokens: int = 128


def tweet_preprocessing(parent: TextPreprocessing | None, max_tokens: int) -> TextPreprocessing:
    """The parent's tokenisation settings for short posts (no header tags, no cleanup)."""
    base = parent or TextPreprocessing()
    return dataclasses.replace(base, remove=(), header_fields=(), max_tokens=max_tokens, max_chars=min(base.max_chars, 4000))


def build_vocabulary(token_lists: Sequence[Sequence[str]], parent: Vocabulary | None, min_freq: int) -> Vocabulary:
    """The parent's tokens (same ids) then the training tokens it lacks, most frequent first."""
    counts: Counter[str] = Counter(token for tokens in token_lists for token in tokens)
    base = list(parent.itos) if parent is not None else [PAD, UNK]
    known = set(base)
    added = sorted((t for t, c in counts.items() if c >= min_freq and t not in known), key=lambda t: (-counts[t], t))
    return Vocabulary([*base, *added], min_freq=min_freq, max_size=None)


def _char_ngrams(word: str, low: int, high: int) -> set[str]:
    padded = f" {word} "
    return {padded[i:i + n] for n in range(low, high + 1) for i in range(max(1, len(padded) - n + 1))}


def feature_matrix(bag: NgramBagClassifier, id_lists: Sequence[Sequence[int]], batch_size: int = 512) -> Any:
    from scipy import sparse

    rows, cols, values = [], [], []
    with torch.inference_mode():
        for start in range(0, len(id_lists), batch_size):
            r, c, v = bag.features(pad_batch(id_lists[start:start + batch_size], bag.config.max_tokens))
            rows.append((r + start).numpy())
            cols.append(c.numpy())
            values.append(v.numpy())
    shape = (len(id_lists), bag.config.num_features)
    return sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=shape)


def build_bag(id_lists: Sequence[Sequence[int]], vocabulary: Vocabulary, num_outputs: int,
              options: BagOptions) -> NgramBagClassifier:
    """An unfitted bag over ``vocabulary`` whose bigram/char tables and IDF come from ``id_lists``."""
    size = len(vocabulary)
    bigram_df: Counter[int] = Counter()
    for ids in id_lists:
        bigram_df.update({a * size + b for a, b in itertools.pairwise(ids) if a and b})
    keys = torch.tensor(sorted(k for k, df in bigram_df.items() if df >= options.bigram_min_df), dtype=torch.long)
    # character n-grams: df over the training texts, counted through the words each text contains
    word_df: Counter[int] = Counter()
    for ids in id_lists:
        word_df.update(set(ids))
    gram_df: Counter[str] = Counter()
    word_grams: dict[int, set[str]] = {}
    for word_id in word_df:
        if word_id > 1:
            word_grams[word_id] = _char_ngrams(vocabulary.itos[word_id], options.char_min, options.char_max)
    for ids in id_lists:
        grams: set[str] = set()
        for word_id in set(ids):
            grams |= word_grams.get(word_id, set())
        gram_df.update(grams)
    kept = sorted((g for g, df in gram_df.items() if df >= options.char_min_df), key=lambda g: (-gram_df[g], g))
    gram_index = {g: i for i, g in enumerate(kept)}
    per_word: list[list[int]] = [[] for _ in range(size)]
    for word_id in range(2, size):  # every vocabulary word, seen in training or not
        grams = word_grams.get(word_id) or _char_ngrams(vocabulary.itos[word_id], options.char_min, options.char_max)
        per_word[word_id] = sorted(gram_index[g] for g in grams if g in gram_index)
    lengths = torch.tensor([len(ids) for ids in per_word], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    flat = torch.tensor([i for ids in per_word for i in ids], dtype=torch.long)
    config = NgramBagConfig(size, num_outputs, len(keys), len(kept), len(flat), max_tokens=options.max_tokens)
    bag = NgramBagClassifier(config)
    bag.bigram_keys.copy_(keys)
    if len(kept):
        bag.char_offsets.copy_(offsets)
        bag.char_ids.copy_(flat)
    document_frequency = np.bincount(feature_matrix(bag, id_lists).indices, minlength=config.num_features)
    bag.idf.copy_(torch.from_numpy(np.log((1 + len(id_lists)) / (1 + document_frequency)) + 1.0).float())
    logger.info("text bag: %d words, %d bigrams, %d char n-grams", size, len(keys), len(kept))
    return bag
