"""The text preprocessing contract shared by training and serving: raw posts → token ids.

Owns, for every text checkpoint:

* ``TextPreprocessing`` — the settings stored as the manifest's ``preprocessing`` dict::

      {"kind": "text", "tokenizer": "spacy-blank-en", "lowercase": true, "remove": [],
       "max_chars": 20000, "max_tokens": 1024, "truncation": "head", "vocab_file": "vocab.json",
       "header_fields": ["subject", "from", "organization"]}

  ``remove`` is any of ``"headers"``, ``"footers"``, ``"quotes"`` (what scikit-learn's
  ``fetch_20newsgroups(remove=…)`` strips, re-implemented here so serving needs no scikit-learn).
* The cleanup and tokenisation rule, applied in this order:

  0. ``header_fields`` tagging: the values of those header lines (``Field: value`` lines before the
     first blank line) are tokenised too and emitted first, each token prefixed ``field:``
     (``subject:linux``), so a classifier can tell a subject word from a body word;
  1. ``remove`` cleanup (headers, then footers/signatures, then quoted replies);
  2. the text is cut to its first ``max_chars`` characters (bounds the per-request cost);
  3. spaCy's rule-based English tokenizer (``spacy.blank("en")``, no model download) splits each
     whitespace-delimited chunk (``ChunkTokenCache`` remembers chunks: the same tokens, several
     times faster); token texts are lowercased when ``lowercase`` is set;
  4. truncation ``"head"``: only the first ``max_tokens`` tokens (tags included) are kept.

* ``Vocabulary`` — ``<pad>`` = 0, ``<unk>`` = 1, then tokens by descending training frequency
  (ties alphabetical) with at least ``min_freq`` occurrences, at most ``max_size`` entries in all.
  Stored as the checkpoint extra file ``vocab.json``.
* ``TextEncoder.encode(texts)`` → ``LongTensor (B, T)``, right-padded with 0, ``1 ≤ T ≤ max_tokens``
  (an empty text becomes a single ``<pad>``).

Imports only torch and the standard library; spaCy is imported lazily on first tokenisation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from models.checkpoint import Manifest

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
TOKENIZER = "spacy-blank-en"
REMOVABLE = ("headers", "footers", "quotes")
TRUNCATIONS = ("head",)
VOCAB_FILE = "vocab.json"
VOCAB_FORMAT = 1


class TextEncodingError(ValueError):
    """Preprocessing settings or a vocabulary file that cannot be used."""


# Bumped when the tokenisation rule changes, so on-disk token caches made under the old one are
# not reused (2: spaCy per whitespace-delimited chunk, ``ChunkTokenCache``).
TOKENISATION_RULE = 2

# ---- settings ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextPreprocessing:
    lowercase: bool = True
    remove: tuple[str, ...] = ()
    max_chars: int = 20_000
    max_tokens: int = 1024
    truncation: str = "head"
    vocab_file: str = VOCAB_FILE
    tokenizer: str = TOKENIZER
    header_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.header_fields and "headers" in self.remove:
            raise TextEncodingError("header_fields tags header lines, which remove=['headers'] strips; choose one")
        if any(not f or not f.replace("-", "").isalnum() or f != f.lower() for f in self.header_fields):
            raise TextEncodingError(f"header_fields must be lower-case field names, got {list(self.header_fields)}")
        unknown = sorted(set(self.remove) - set(REMOVABLE))
        if unknown:
            raise TextEncodingError(f"remove: unknown parts {unknown}; choose from {list(REMOVABLE)}")
        if self.tokenizer != TOKENIZER:
            raise TextEncodingError(f"tokenizer {self.tokenizer!r} is not supported (only {TOKENIZER!r})")
        if self.truncation not in TRUNCATIONS:
            raise TextEncodingError(f"truncation {self.truncation!r} is not one of {list(TRUNCATIONS)}")
        if self.max_tokens < 1 or self.max_chars < 1:
            raise TextEncodingError("max_tokens and max_chars must be ≥ 1")
        # canonical order, so equal settings compare (and cache) equal
        object.__setattr__(self, "remove", tuple(part for part in REMOVABLE if part in self.remove))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["remove"] = list(self.remove)
        values["header_fields"] = list(self.header_fields)
        return {"kind": "text", **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TextPreprocessing:
        values = dict(values)
        kind = values.pop("kind", "text")
        if kind != "text":
            raise TextEncodingError(f"preprocessing kind {kind!r} is not 'text'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TextEncodingError(f"unknown text preprocessing fields {unknown}; known: {sorted(known)}")
        for name in ("remove", "header_fields"):
            if name in values:
                if isinstance(values[name], str) or not isinstance(values[name], list | tuple):
                    raise TextEncodingError(f"preprocessing {name!r} must be a list")
                values[name] = tuple(values[name])
        return cls(**values)

    @property
    def read_chars(self) -> int | None:
        """How many leading characters of a text decide its tokens (None: the whole text can).

        With nothing removed, tokens come from the first ``max_chars`` characters and the header
        block's first 4,096 (see ``header_values``), so a longer text can be cut there before
        tokenising with no change: the cost of a long post is bounded by what the model reads.
        Cleanup (``remove``) looks at a whole text (a signature at its end), so it is not cut then.
        """
        if self.remove:
            return None
        return max(self.max_chars, _HEADER_CHARS) if self.header_fields else self.max_chars

    def cache_key(self) -> str:
        """The settings that change token lists (not the vocabulary): for on-disk token caches."""
        values = {k: v for k, v in self.to_dict().items() if k != "vocab_file"}
        return json.dumps({**values, "tokenisation_rule": TOKENISATION_RULE}, sort_keys=True)


# ---- cleanup (what sklearn's remove= strips) -----------------------------------------------

_QUOTE_RE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def strip_headers(text: str) -> str:
    """Everything after the first blank line (the header block ends there)."""
    _, blank, body = text.partition("\n\n")
    return body if blank else text


def strip_footer(text: str) -> str:
    """Drop the signature: everything from the last line made only of dashes (or blank)."""
    lines = text.strip().split("\n")
    for number in range(len(lines) - 1, -1, -1):
        if lines[number].strip().strip("-") == "":
            break
    else:
        return text
    return "\n".join(lines[:number]) if number > 0 else text


def strip_quotes(text: str) -> str:
    """Drop quoted lines ('>' or '|') and the 'In article … writes:' attribution lines."""
    return "\n".join(line for line in text.split("\n") if not _QUOTE_RE.search(line))


def clean_text(text: str, remove: Sequence[str]) -> str:
    if "headers" in remove:
        text = strip_headers(text)
    if "footers" in remove:
        text = strip_footer(text)
    if "quotes" in remove:
        text = strip_quotes(text)
    return text


_HEADER_CHARS = 4096  # the header block is read no further than this


def header_values(text: str, fields: Sequence[str]) -> list[tuple[str, str]]:
    """(field, value) of the ``fields`` header lines in the block before the first blank line."""
    found = []
    for line in text.split("\n\n", 1)[0][:_HEADER_CHARS].split("\n"):
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if colon and name in fields:
            found.append((name, value))
    return found


# ---- tokenisation ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def spacy_tokenizer() -> Any:
    """spaCy's rule-based English tokenizer (needs no downloaded model)."""
    import spacy

    return spacy.blank("en").tokenizer


# spaCy's affix loop rescans the rest of a chunk for every prefix or suffix it splits off, so a
# long run of symbols costs the square of its length. No chunk of the 20 Newsgroups training posts
# is longer than LONG_CHUNK_CHARS, so splitting longer ones into CHUNK_WINDOW_CHARS windows
# changes no real post's tokens and bounds the cost per token of any text.
LONG_CHUNK_CHARS = 256
CHUNK_WINDOW_CHARS = 64


def _chunks(text: str) -> list[str]:
    """``text`` split at whitespace (str.isspace, as spaCy does); over-long chunks in windows."""
    chunks = text.split()
    if any(len(chunk) > LONG_CHUNK_CHARS for chunk in chunks):
        chunks = [window for chunk in chunks
                  for window in ([chunk] if len(chunk) <= LONG_CHUNK_CHARS else
                                 [chunk[i:i + CHUNK_WINDOW_CHARS] for i in range(0, len(chunk), CHUNK_WINDOW_CHARS)])]
    return chunks


class ChunkTokenCache:
    """spaCy's tokenisation, remembered per whitespace-delimited chunk.

    spaCy splits a text at whitespace first and tokenises each chunk on its own (prefixes, suffixes
    and infixes never look across whitespace), so a text's tokens are its chunks' tokens in order.
    Only its special-case matching can see a neighbour: on all 11,314 20 Newsgroups training posts
    one token differs from whole-document spaCy (":)" followed by " )", which whole-document spaCy
    splits and chunk-wise keeps). Natural text repeats its chunks (Zipf), so remembering them skips
    most of spaCy's work: its own cache stops after 10,000 chunks and stops filling within a document
    once a special case is hit, and even a hit pays for a Python ``Token`` per token. ``tests/text``
    checks equality with spaCy per chunk, and with whole-document spaCy on real posts. It holds
    chunks and tokens of at most ``max_chars`` characters in all (then it starts afresh: a bound on
    memory that hostile input cannot push further); safe to share between threads (each call works
    on its own view; dict operations are atomic under the GIL).
    """

    def __init__(self, max_chars: int = 8_000_000) -> None:
        self.max_chars = max_chars
        self._tokens: dict[str, tuple[str, ...]] = {}
        self._chars = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def tokens(self, texts: Sequence[str], limit: int | None = None) -> list[list[str]]:
        """The non-whitespace token texts of each of ``texts`` (not lowercased); with ``limit``, at
        least the first ``limit`` of each (its first chunks, in rounds: the rest is never tokenised)."""
        chunk_lists = [_chunks(text) for text in texts]
        if limit is None:
            self._tokenize_missing([chunk for chunks in chunk_lists for chunk in chunks])
            known = self._view(chunk_lists)
            return [[token for chunk in chunks for token in known[chunk]] for chunks in chunk_lists]
        # Rounds: each takes, per text, chunks of at most as many characters as it still needs tokens
        # (a chunk has at least one token and at most one per character), so no round reads far past
        # the limit, and a text of ordinary words finishes in a few.
        done = [0] * len(texts)
        found: list[list[str]] = [[] for _ in texts]
        while True:
            taken = []
            for index, chunks in enumerate(chunk_lists):
                need, end, chars = limit - len(found[index]), done[index], 0
                while need > 0 and end < len(chunks) and (end == done[index] or chars + len(chunks[end]) <= need):
                    chars += len(chunks[end])
                    end += 1
                taken.append(chunks[done[index]:end])
                done[index] = end
            if not any(taken):
                return found
            self._tokenize_missing([chunk for chunks in taken for chunk in chunks])
            known = self._view(taken)
            for index, chunks in enumerate(taken):
                found[index].extend(token for chunk in chunks for token in known[chunk])

    def _view(self, chunk_lists: Sequence[Sequence[str]]) -> dict[str, tuple[str, ...]]:
        cache = self._tokens  # another thread may start the cache afresh meanwhile: keep this one
        return {chunk: cache.get(chunk) or self._tokenize_chunks([chunk])[chunk]
                for chunks in chunk_lists for chunk in chunks}

    def _tokenize_missing(self, chunks: Sequence[str]) -> None:
        missing = list(dict.fromkeys(chunk for chunk in chunks if chunk not in self._tokens))
        if not missing:
            return
        fresh = self._tokenize_chunks(missing)
        size = sum(len(chunk) + sum(map(len, tokens)) for chunk, tokens in fresh.items())
        if self._chars + size > self.max_chars:
            self._tokens, self._chars = {}, 0
        self._tokens.update(fresh)
        self._chars += size

    @staticmethod
    def _tokenize_chunks(chunks: list[str]) -> dict[str, tuple[str, ...]]:
        # One spaCy call per chunk: joining chunks into one document is faster but not equal, since
        # spaCy then skips some special cases (":>" came back as ":", ">" in a few 20 Newsgroups posts).
        return {chunk: tuple(token.text for token in spacy_tokenizer()(chunk)) for chunk in chunks}


_CHUNK_CACHE = ChunkTokenCache()


def _token_texts(texts: Sequence[str], lower: bool, limit: int | None = None) -> list[list[str]]:
    token_lists = _CHUNK_CACHE.tokens(texts, limit)
    if lower:
        return [[token.lower() for token in tokens] for tokens in token_lists]
    return token_lists


def tokenize(texts: Iterable[str], preprocessing: TextPreprocessing) -> list[list[str]]:
    """Token lists of ``texts`` under ``preprocessing`` (steps 1–4 of the module docstring)."""
    limit, lower, fields = preprocessing.max_tokens, preprocessing.lowercase, preprocessing.header_fields
    texts = list(texts)
    tags: list[list[str]] = [[] for _ in texts]
    if fields:
        found = [(i, name, value) for i, text in enumerate(texts) for name, value in header_values(text, fields)]
        for (i, name, _), tokens in zip(found, _token_texts([value for _, _, value in found], lower), strict=True):
            tags[i].extend(f"{name}:{token}" for token in tokens)
    prepared = [clean_text(text, preprocessing.remove)[: preprocessing.max_chars] for text in texts]
    return [(tagged + tokens)[:limit] for tagged, tokens in zip(tags, _token_texts(prepared, lower, limit), strict=True)]


# ---- vocabulary --------------------------------------------------------------------------------

class Vocabulary:
    """Token ↔ id. Id 0 is ``<pad>``, id 1 is ``<unk>``; unknown tokens map to 1."""

    def __init__(self, tokens: Sequence[str], min_freq: int = 1, max_size: int | None = None) -> None:
        if list(tokens[:2]) != [PAD, UNK]:
            raise TextEncodingError(f"a vocabulary must start with {PAD!r}, {UNK!r}")
        self.itos = list(tokens)
        self.stoi = {token: index for index, token in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):  # one pass over 150k tokens, not a set and then the dict
            raise TextEncodingError("vocabulary tokens must be unique")
        self.min_freq, self.max_size = min_freq, max_size

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(
        cls, token_lists: Iterable[Sequence[str]], min_freq: int = 2, max_size: int | None = 100_000
    ) -> Vocabulary:
        """Tokens seen at least ``min_freq`` times, most frequent first, ``max_size`` ids in all."""
        if min_freq < 1:
            raise TextEncodingError("min_freq must be ≥ 1")
        if max_size is not None and max_size < 2:
            raise TextEncodingError("max_size must leave room for <pad> and <unk> (≥ 2)")
        counts: Counter[str] = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        counts.pop(PAD, None)
        counts.pop(UNK, None)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max_size - 2]
        return cls([PAD, UNK, *kept], min_freq, max_size)

    def lookup(self, tokens: Sequence[str]) -> list[int]:
        get = self.stoi.get
        return [get(token, UNK_ID) for token in tokens]

    def to_json_bytes(self) -> bytes:
        values = {"format": VOCAB_FORMAT, "min_freq": self.min_freq, "max_size": self.max_size, "tokens": self.itos}
        return json.dumps(values, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json_bytes(cls, content: bytes) -> Vocabulary:
        try:
            values = json.loads(content.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TextEncodingError(f"vocabulary is not valid UTF-8 JSON ({error})") from None
        if not isinstance(values, dict) or values.get("format") != VOCAB_FORMAT:
            raise TextEncodingError(f"vocabulary format must be {VOCAB_FORMAT}")
        tokens = values.get("tokens")
        if not isinstance(tokens, list) or not set(map(type, tokens)) <= {str}:
            raise TextEncodingError("vocabulary 'tokens' must be a list of strings")
        return cls(tokens, int(values.get("min_freq", 1)), values.get("max_size"))


# ---- the encoder -------------------------------------------------------------------------------

def pad_batch(id_lists: Sequence[Sequence[int]], max_tokens: int) -> torch.Tensor:
    """Right-pad with ``PAD_ID`` into a (B, T) LongTensor; T = longest (≤ max_tokens), at least 1."""
    length = max(1, min(max_tokens, max((len(ids) for ids in id_lists), default=0)))
    batch = torch.zeros(len(id_lists), length, dtype=torch.long)  # (B, T)
    for row, ids in enumerate(id_lists):
        ids = ids[:length]
        if ids:
            batch[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return batch


class TextEncoder:
    """Raw texts → (B, T) token ids under a checkpoint's preprocessing and vocabulary."""

    def __init__(self, preprocessing: TextPreprocessing, vocabulary: Vocabulary) -> None:
        self.preprocessing, self.vocabulary = preprocessing, vocabulary

    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        return tokenize(texts, self.preprocessing)

    def ids(self, token_lists: Sequence[Sequence[str]]) -> list[list[int]]:
        return [self.vocabulary.lookup(tokens) for tokens in token_lists]

    def encode_tokens(self, token_lists: Sequence[Sequence[str]]) -> torch.Tensor:
        return pad_batch(self.ids(token_lists), self.preprocessing.max_tokens)  # (B, T)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, T) LongTensor of token ids, 0-padded on the right, 1 ≤ T ≤ max_tokens."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        return self.encode_tokens(self.tokenize(texts))


def load_text_encoder(checkpoint_dir: str | Path, manifest: Manifest) -> TextEncoder:
    """The encoder a text checkpoint was trained with (its preprocessing and verified vocabulary)."""
    from models.checkpoint import CheckpointError, read_extra_file

    try:
        preprocessing = TextPreprocessing.from_dict(manifest.preprocessing)
        vocabulary = Vocabulary.from_json_bytes(read_extra_file(checkpoint_dir, manifest, preprocessing.vocab_file))
    except TextEncodingError as error:
        raise CheckpointError(f"{checkpoint_dir}: {error}") from None
    vocab_size = manifest.config.get("vocab_size")
    if vocab_size is not None and int(vocab_size) != len(vocabulary):
        raise CheckpointError(
            f"{checkpoint_dir}: vocabulary has {len(vocabulary)} tokens but the model expects {vocab_size}"
        )
    return TextEncoder(preprocessing, vocabulary)
