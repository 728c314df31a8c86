"""The text preprocessing contract: tokenizer, cleanup, vocabulary, encoder and its checkpoint form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model
from models.checkpoint import CheckpointError, new_manifest, save_checkpoint
from models.text_encoding import (
    PAD_ID,
    UNK_ID,
    ChunkTokenCache,
    TextEncoder,
    TextEncodingError,
    TextPreprocessing,
    Vocabulary,
    clean_text,
    load_text_encoder,
    spacy_tokenizer,
    tokenize,
)

POST = """From: jane@example.edu (Jane Doe)
Subject: Re: Orbit of the Shuttle
Organization: Example University

In article <1@x.com> bob@x.com writes:
> the shuttle is slow
I think the Shuttle's orbit is LOW.

--
Jane
"""


def test_tokenizer_splits_punctuation_lowercases_and_drops_whitespace() -> None:
    tokens = tokenize(["Hello,   World!\n\nIt's NASA."], TextPreprocessing())[0]
    assert tokens == ["hello", ",", "world", "!", "it", "'s", "nasa", "."]
    assert tokenize(["Hello World"], TextPreprocessing(lowercase=False))[0] == ["Hello", "World"]


def test_tokenizer_truncates_to_max_tokens_after_cleanup() -> None:
    tokens = tokenize([POST], TextPreprocessing(max_tokens=5, remove=("headers",)))[0]
    assert tokens == ["in", "article", "<", "1@x.com", ">"]


def test_remove_strips_headers_signature_and_quoted_lines() -> None:
    cleaned = clean_text(POST, ("headers", "footers", "quotes"))
    assert "Subject" not in cleaned and "Jane" not in cleaned and "writes:" not in cleaned
    assert "the shuttle is slow" not in cleaned
    assert "I think the Shuttle's orbit is LOW." in cleaned
    assert clean_text(POST, ()) == POST


def test_header_fields_are_tagged_before_the_body_tokens() -> None:
    tokens = tokenize([POST], TextPreprocessing(header_fields=("subject",)))[0]
    assert tokens[:6] == ["subject:re", "subject::", "subject:orbit", "subject:of", "subject:the", "subject:shuttle"]
    assert tokens[6:9] == ["from", ":", "jane@example.edu"]


def test_preprocessing_round_trips_through_the_manifest_dict() -> None:
    settings = TextPreprocessing(lowercase=False, remove=("quotes", "headers"), max_tokens=77)
    values = settings.to_dict()
    assert values["kind"] == "text" and values["tokenizer"] == "spacy-blank-en" and values["remove"] == ["headers", "quotes"]
    assert TextPreprocessing.from_dict(values) == settings


@pytest.mark.parametrize("values, message", [
    ({"remove": ["signatures"]}, "unknown parts"),
    ({"tokenizer": "bert"}, "not supported"),
    ({"max_tokens": 0}, "≥ 1"),
    ({"colour": "red"}, "unknown text preprocessing fields"),
    ({"kind": "image"}, "not 'text'"),
    ({"remove": ["headers"], "header_fields": ["subject"]}, "choose one"),
])
def test_preprocessing_rejects_bad_settings_clearly(values: dict[str, object], message: str) -> None:
    with pytest.raises(TextEncodingError, match=message):
        TextPreprocessing.from_dict(values)


def test_vocabulary_keeps_frequent_tokens_in_order_with_pad_and_unk_first() -> None:
    vocabulary = Vocabulary.build([["b", "a", "b", "c"], ["b", "a", "d"]], min_freq=2, max_size=10)
    assert vocabulary.itos == ["<pad>", "<unk>", "b", "a"]
    assert vocabulary.lookup(["a", "zzz", "b"]) == [3, UNK_ID, 2]
    assert len(Vocabulary.build([["x", "y", "z"]], min_freq=1, max_size=3)) == 3


def test_vocabulary_round_trips_through_json_bytes() -> None:
    vocabulary = Vocabulary.build([["naïve", "café", "b"], ["café"]], min_freq=1)
    restored = Vocabulary.from_json_bytes(vocabulary.to_json_bytes())
    assert restored.itos == vocabulary.itos and restored.stoi == vocabulary.stoi
    with pytest.raises(TextEncodingError, match="must start with"):
        Vocabulary.from_json_bytes(b'{"format": 1, "tokens": ["a", "b"]}')
    with pytest.raises(TextEncodingError, match="JSON"):
        Vocabulary.from_json_bytes(b"not json")
    with pytest.raises(TextEncodingError, match="unique"):
        Vocabulary.from_json_bytes(b'{"format": 1, "tokens": ["<pad>", "<unk>", "a", "b", "a"]}')
    with pytest.raises(TextEncodingError, match="list of strings"):
        Vocabulary.from_json_bytes(b'{"format": 1, "tokens": ["<pad>", "<unk>", "a", 7]}')


def test_encode_pads_with_zero_and_never_returns_an_empty_row() -> None:
    encoder = TextEncoder(TextPreprocessing(max_tokens=4), Vocabulary.build([["a", "b", "c"]], min_freq=1))
    ids = encoder.encode(["a b", "a b c a b c", ""])
    assert ids.dtype == torch.long and ids.shape == (3, 4)
    assert ids[0].tolist() == [2, 3, PAD_ID, PAD_ID]
    assert ids[2].tolist() == [PAD_ID] * 4
    assert encoder.encode([""]).shape == (1, 1)
    with pytest.raises(TypeError):
        encoder.encode("a b")  # type: ignore[arg-type]


def _text_checkpoint(directory: Path, vocabulary: Vocabulary, vocab_size: int) -> Path:
    settings = TextPreprocessing(max_tokens=16, header_fields=("subject",))
    model = build_model("ngram_bag", {"vocab_size": vocab_size, "num_classes": 2})
    manifest = new_manifest("t", "text", "ngram_bag", model.config, classes=["a", "b"],  # type: ignore[arg-type]
                            preprocessing=settings.to_dict())
    return save_checkpoint(directory, model, manifest, extra_files={"vocab.json": vocabulary.to_json_bytes()})


def test_load_text_encoder_reads_the_checkpoint_vocabulary(tmp_path: Path) -> None:
    from models.checkpoint import read_manifest

    vocabulary = Vocabulary.build([["subject:orbit", "orbit"]], min_freq=1)
    directory = _text_checkpoint(tmp_path / "ok", vocabulary, len(vocabulary))
    encoder = load_text_encoder(directory, read_manifest(directory))
    assert encoder.vocabulary.itos == vocabulary.itos and encoder.preprocessing.max_tokens == 16
    # the tag first, then the body tokens "subject" ":" "orbit" "orbit"
    assert encoder.encode(["Subject: orbit\n\norbit"]).tolist() == [[3, UNK_ID, UNK_ID, 2, 2]]


def test_load_text_encoder_refuses_a_vocabulary_the_model_does_not_fit(tmp_path: Path) -> None:
    from models.checkpoint import read_manifest

    vocabulary = Vocabulary.build([["a", "b"]], min_freq=1)
    directory = _text_checkpoint(tmp_path / "bad", vocabulary, len(vocabulary) + 5)
    with pytest.raises(CheckpointError, match="vocabulary has 4 tokens but the model expects 9"):
        load_text_encoder(directory, read_manifest(directory))


def test_chunk_cache_tokenises_like_spacy_per_chunk_and_reuses_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [POST, "Win:) )\n:>I (cond'):  tab\tnbsp\u00a0x", "", "   \n"]
    spacy_chunks = [[t.text for chunk in text.split() for t in spacy_tokenizer()(chunk)] for text in texts]
    cache = ChunkTokenCache()
    assert cache.tokens(texts) == spacy_chunks
    assert len(cache) == len({chunk for text in texts for chunk in text.split()})
    calls = []
    monkeypatch.setattr(ChunkTokenCache, "_tokenize_chunks", staticmethod(lambda chunks: calls.append(chunks) or {}))
    assert cache.tokens(texts) == spacy_chunks  # every chunk is known now: spaCy is not called
    assert calls == []


def test_chunk_cache_equals_whole_document_spacy_on_real_posts(news_subset: Path) -> None:
    posts = [path.read_text(encoding="latin-1") for path in sorted(news_subset.rglob("*")) if path.is_file()]
    whole = [[t.text for t in doc if not t.is_space] for doc in spacy_tokenizer().pipe(posts)]
    assert ChunkTokenCache().tokens(posts) == whole


def test_chunk_cache_starts_afresh_at_its_bound_in_characters() -> None:
    cache = ChunkTokenCache(max_chars=12)  # a one-letter chunk and its token: 2 characters
    assert cache.tokens(["a b c d e"]) == [["a", "b", "c", "d", "e"]]
    assert len(cache) == 5
    assert cache.tokens(["f g h"]) == [["f", "g", "h"]] and len(cache) == 3  # 10 + 6 > 12: afresh


def test_long_runs_of_symbols_are_tokenised_in_windows_and_only_as_far_as_the_limit() -> None:
    import time

    symbols = "".join(chr(0x2600 + (i * 7) % 255) for i in range(19_000))  # few repeats, no whitespace
    started = time.perf_counter()
    tokens = ChunkTokenCache().tokens([symbols], limit=100)[0]
    assert time.perf_counter() - started < 1.0
    assert tokens[:100] == [t.text for t in spacy_tokenizer()(symbols[:100])]
    ordinary = "the cat sat on the mat " * 50
    assert ChunkTokenCache().tokens([ordinary], limit=7)[0][:7] == ordinary.split()[:7]
