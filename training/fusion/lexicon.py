"""A sentiment lexicon mapped onto a vocabulary: the tables of late fusion's lexicon features.

The lexicon is VADER's (Hutto & Gilbert, 2014; MIT licence): about 7,500 words, slang and
emoticons, each with a mean human valence rating from −4 to +4, read from the ``vaderSentiment``
wheel (a ``train`` extra). Only the per-token tables go into a checkpoint, so the service needs
neither the package nor the file. A hashtag's word counts as the word (``#happy`` → ``happy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files

import torch

NEGATORS = frozenset({
    "not", "n't", "no", "never", "none", "nobody", "nothing", "neither", "nor", "nowhere", "cannot", "without",
    "dont", "cant", "wont", "isnt", "arent", "wasnt", "werent", "didnt", "doesnt", "aint", "hardly", "rarely",
})


def read_vader_lexicon() -> dict[str, float]:
    """token → mean valence (−4 … +4) from the lexicon file inside the ``vaderSentiment`` package."""
    try:
        text = (files("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8")
    except ModuleNotFoundError as error:
        raise RuntimeError("the sentiment lexicon needs the vaderSentiment package: pip install -e '.[train]'") from error
    lexicon = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            lexicon[parts[0]] = float(parts[1])
    return lexicon


def lexicon_tables(itos: Sequence[str], lexicon: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(valence (V,), negator (V,) bool) for the vocabulary ``itos`` (lower-cased lookups)."""
    valence = torch.zeros(len(itos))
    negator = torch.zeros(len(itos), dtype=torch.bool)
    for index, token in enumerate(itos):
        word = token.lower()
        value = lexicon.get(word, lexicon.get(word.lstrip("#"), 0.0))
        valence[index] = value
        negator[index] = word in NEGATORS
    return valence, negator
