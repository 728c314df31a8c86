"""Text classifiers served as ``model(token_ids)`` → logits, token ids from ``models.text_encoding``.

* ``bilstm`` — the seed's baseline (2-layer bidirectional LSTM, embedding 100, hidden 256, dropout
  0.5) with its bugs fixed: padded positions are skipped with packed sequences and the sentence
  vector is the last layer's final forward and backward states, not the output at the last padded
  time step.
* ``ngram_bag`` — a TF-IDF-style linear model computed inside the module from token ids: sublinear
  term frequencies (1 + log count) of word unigrams, word bigrams (looked up exactly in a sorted
  table of the bigrams seen in training) and, optionally, character n-grams of each vocabulary
  word (a CSR table built at training time), each multiplied by its IDF, every block L2-normalised,
  then one linear layer. Training fits the weights (e.g. with scikit-learn) on exactly the features
  ``features()`` computes, so training and serving cannot drift apart.

Every table the forward pass needs is a buffer in the state dict, so a checkpoint rebuilds the model
from its manifest config alone.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register_model

# ---- the seed's BiLSTM, fixed ------------------------------------------------------------------

@dataclasses.dataclass
class BiLSTMConfig:
    vocab_size: int = 2
    num_classes: int = 20
    embedding_dim: int = 100
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.5
    padding_idx: int = 0
    max_tokens: int = 512


class BiLSTMClassifier(nn.Module):
    """Embedding → packed 2-layer BiLSTM → [final forward state; final backward state] → linear."""

    def __init__(self, config: BiLSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.padding_idx)
        self.lstm = nn.LSTM(config.embedding_dim, config.hidden_size, config.num_layers, batch_first=True,
                            bidirectional=True, dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * config.hidden_size, config.num_classes)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        token_ids = token_ids[:, : self.config.max_tokens]  # (B, T)
        lengths = (token_ids != self.config.padding_idx).sum(dim=1).clamp(min=1).cpu()  # empty text: one pad
        embedded = self.dropout(self.embedding(token_ids))  # (B, T, E)
        packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)  # hidden: (layers * 2, B, H), in the caller's batch order
        final = torch.cat([hidden[-2], hidden[-1]], dim=1)  # (B, 2H): last layer forward, backward
        return self.head(self.dropout(final))  # (B, classes)


@register_model("bilstm", BiLSTMConfig)
def build_bilstm(config: BiLSTMConfig) -> nn.Module:
    return BiLSTMClassifier(config)


# ---- the TF-IDF-style n-gram bag ----------------------------------------------------------------

@dataclasses.dataclass
class NgramBagConfig:
    vocab_size: int = 2
    num_classes: int = 20
    num_bigrams: int = 0  # rows of the sorted bigram-key table (0: unigrams only)
    num_char_ngrams: int = 0  # character n-gram features (0: none)
    char_table_size: int = 0  # entries of the word → char n-gram CSR table
    sublinear_tf: bool = True
    max_tokens: int = 4096
    padding_idx: int = 0
    weight_dtype: str = "float32"  # float32 | float16 (halves the checkpoint; logits are summed in float32)
    # Part of the calibration: the logits are sign(s)·|s|^p of the linear scores s. A linear SVM's
    # scores bunch up near its margins, so one temperature leaves them over-confident at the top and
    # under-confident in the middle; p > 1 (fitted with the temperature on held-out predictions)
    # spreads them out. 1: the scores unchanged.
    score_power: float = 1.0

    @property
    def num_features(self) -> int:
        return self.vocab_size + self.num_bigrams + self.num_char_ngrams


def _segment_l2_normalise(rows: torch.Tensor, weights: torch.Tensor, batch: int) -> torch.Tensor:
    norms = torch.zeros(batch, dtype=weights.dtype, device=weights.device).index_add_(0, rows, weights * weights)
    return weights / norms.sqrt().clamp(min=1e-12)[rows]


def _count_pairs(rows: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                 width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum ``counts`` over equal (row, id) pairs: (rows, ids, summed counts), sorted by row then id."""
    keys = rows * width + ids
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(unique.size(0), dtype=counts.dtype, device=counts.device).index_add_(0, inverse, counts)
    return unique // width, unique % width, summed


def _tf(counts: torch.Tensor, sublinear: bool) -> torch.Tensor:
    counts = counts.float()
    return 1.0 + counts.log() if sublinear else counts


# The computation of the n-gram bag, as functions of tensors and numbers that TorchScript compiles
# (``NgramBagClassifier.scripted``): the eager module calls the same functions.

def ngram_bag_features(token_ids: torch.Tensor, idf: torch.Tensor, bigram_keys: torch.Tensor,
                       char_offsets: torch.Tensor, char_ids: torch.Tensor, vocab_size: int, num_bigrams: int,
                       num_char_ngrams: int, max_tokens: int, padding_idx: int,
                       sublinear_tf: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse features as (rows, feature ids, values), sorted by row; each block L2-normalised."""
    token_ids = token_ids[:, :max_tokens]  # (B, T)
    batch, length = token_ids.size(0), token_ids.size(1)
    device = token_ids.device
    positions = torch.arange(batch, device=device).unsqueeze(1).expand(batch, length)  # (B, T)
    present = token_ids != padding_idx
    rows, ids = positions[present], token_ids[present]
    word_rows, word_ids, word_counts = _count_pairs(rows, ids, torch.ones_like(ids), vocab_size)
    rows_w, ids_w, counts_w = word_rows, word_ids, word_counts
    if num_bigrams > 0 and length > 1:
        pair_present = present[:, :-1] & present[:, 1:]  # (B, T-1)
        keys = (token_ids[:, :-1] * vocab_size + token_ids[:, 1:])[pair_present]
        where = torch.searchsorted(bigram_keys, keys).clamp(max=num_bigrams - 1)
        known = bigram_keys[where] == keys
        pair_rows = positions[:, :-1][pair_present][known]
        found = where[known]
        rows_b, ids_b, counts_b = _count_pairs(pair_rows, found, torch.ones_like(found), num_bigrams)
        # word and bigram features share one L2 norm (as one TF-IDF vectoriser over both)
        rows_w = torch.cat([rows_w, rows_b])
        ids_w = torch.cat([ids_w, ids_b + vocab_size])
        counts_w = torch.cat([counts_w, counts_b])
    values_w = _segment_l2_normalise(rows_w, _tf(counts_w, sublinear_tf) * idf[ids_w], batch)
    if num_char_ngrams == 0:
        order = torch.argsort(rows_w, stable=True)
        return rows_w[order], ids_w[order], values_w[order]
    starts, ends = char_offsets[word_ids], char_offsets[word_ids + 1]
    spans = ends - starts  # n-grams of each (row, word)
    owner = torch.repeat_interleave(torch.arange(word_ids.size(0), device=device), spans)
    offsets_within = torch.arange(owner.size(0), device=device) - torch.repeat_interleave(
        torch.cumsum(spans, 0) - spans, spans)
    grams = char_ids[starts[owner] + offsets_within].long()
    rows_c, ids_c, counts_c = _count_pairs(word_rows[owner], grams, word_counts[owner], num_char_ngrams)
    ids_c = ids_c + vocab_size + num_bigrams
    values_c = _segment_l2_normalise(rows_c, _tf(counts_c, sublinear_tf) * idf[ids_c], batch)
    rows_all = torch.cat([rows_w, rows_c])
    order = torch.argsort(rows_all, stable=True)
    return rows_all[order], torch.cat([ids_w, ids_c])[order], torch.cat([values_w, values_c])[order]


def ngram_bag_scores(token_ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, idf: torch.Tensor,
                     bigram_keys: torch.Tensor, char_offsets: torch.Tensor, char_ids: torch.Tensor, vocab_size: int,
                     num_bigrams: int, num_char_ngrams: int, max_tokens: int, padding_idx: int, sublinear_tf: bool,
                     score_power: float) -> torch.Tensor:
    """(B, T) token ids → (B, classes) logits: the linear layer over the sparse features."""
    rows, ids, values = ngram_bag_features(token_ids, idf, bigram_keys, char_offsets, char_ids, vocab_size,
                                           num_bigrams, num_char_ngrams, max_tokens, padding_idx, sublinear_tf)
    contributions = F.embedding(ids, weight).float() * values.unsqueeze(1)  # (N, classes)
    logits = torch.zeros(token_ids.size(0), weight.size(1), device=values.device)
    scores = logits.index_add_(0, rows, contributions) + bias  # (B, classes)
    return signed_power(scores, score_power)


@functools.cache
def _scripted_scores() -> Callable[..., torch.Tensor]:
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.compile, which splits this data-dependent code
        # (unique, masks) into graphs joined by Python; torch is pinned, and the service checks the
        # script against eager at load
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(ngram_bag_scores)  # type: ignore[no-any-return]


class NgramBagClassifier(nn.Module):
    """(B, T) token ids → sparse TF-IDF features of words, bigrams and char n-grams → linear logits."""

    def __init__(self, config: NgramBagConfig) -> None:
        super().__init__()
        self.config = config
        features = config.num_features
        if config.weight_dtype not in ("float32", "float16"):
            raise ValueError(f"weight_dtype must be float32 or float16, got {config.weight_dtype!r}")
        dtype = torch.float16 if config.weight_dtype == "float16" else torch.float32
        self.weight = nn.Parameter(torch.zeros(features, config.num_classes, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(config.num_classes))
        self.register_buffer("idf", torch.ones(features))
        self.register_buffer("bigram_keys", torch.zeros(config.num_bigrams, dtype=torch.long))  # sorted a*V+b
        self.register_buffer("char_offsets", torch.zeros(config.vocab_size + 1 if config.num_char_ngrams else 0,
                                                         dtype=torch.long))
        self.register_buffer("char_ids", torch.zeros(config.char_table_size, dtype=torch.int32))  # int32: half the bytes
        self.idf: torch.Tensor
        self.bigram_keys: torch.Tensor
        self.char_offsets: torch.Tensor
        self.char_ids: torch.Tensor

    def _sizes(self) -> tuple[int, int, int, int, int, bool]:
        c = self.config  # read on every call: training replaces it (e.g. a fitted score_power)
        return c.vocab_size, c.num_bigrams, c.num_char_ngrams, c.max_tokens, c.padding_idx, c.sublinear_tf

    def features(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sparse features as (rows, feature ids, values), sorted by row; each block L2-normalised."""
        return ngram_bag_features(token_ids, self.idf, self.bigram_keys, self.char_offsets, self.char_ids,
                                  *self._sizes())

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return ngram_bag_scores(token_ids, self.weight, self.bias, self.idf, self.bigram_keys, self.char_offsets,
                                self.char_ids, *self._sizes(), self.config.score_power)

    def scripted(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward pass as one TorchScript call, with this model's tensors and its config as it is
        now. For serving: the eager forward runs some forty small operations, each of which gives the
        GIL up and must win it back, so beside a busy Python thread it took several times as long as alone
        (docs/serving.md#tracing): the compiled function holds the GIL only to start."""
        scores = _scripted_scores()
        tensors = (self.weight, self.bias, self.idf, self.bigram_keys, self.char_offsets, self.char_ids)
        numbers = (*self._sizes(), float(self.config.score_power))
        return lambda token_ids: scores(token_ids, *tensors, *numbers)


def signed_power(scores: torch.Tensor, power: float) -> torch.Tensor:
    """sign(s)·|s|^power, elementwise (monotone: the arg-max is unchanged)."""
    return scores if power == 1.0 else scores.sign() * scores.abs().pow(power)


@register_model("ngram_bag", NgramBagConfig)
def build_ngram_bag(config: NgramBagConfig) -> nn.Module:
    return NgramBagClassifier(config)
