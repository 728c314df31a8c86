"""The pretrained sentence encoder of late fusion: tokenizer and encoder against their references,
reading a sentence-transformers folder, training with it, and the checkpoint it ends up in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sentencekit import write_sentence_source

from models.checkpoint import load_checkpoint, sha256_file
from models.fusion import FusionInputError, collate_fusion_batch, fusion_preprocessing, load_fusion_sentence_tokenizer
from models.sentence_encoder import SentenceEncoder, SentenceEncoderConfig, WordPieceTokenizer
from training.cli import main
from training.fusion.data import load_pairs
from training.fusion.sentence import SentenceSourceError, load_sentence_source

SHIPPED = Path(__file__).resolve().parents[3] / "checkpoints" / "mvsa-fusion"
TRICKY = [
    "I love this sunset, best day ever!", "ugh, stuck in traffic AGAIN #monday", "The meeting is at noon.",
    "RT @user: don't!!! :) http://t.co/AbC123", "İstanbul ÇAFÉ naïve résumé", "日本語のテキスト and 中文",
    "a\x00b\u200bc\ufffdd\x07e", "x" * 150, "ﬁne ＡＢＣ ½ ²", "tab\there\nnewline\u00a0nbsp\u2003em",
    "unassigned \u05fc\u0328L char", "emoji 😀👍🏽 and ☃", "", "   ", "soooo goooood!!!!", "state-of-the-art, e.g. U.S.A.",
]


def _shipped_sentence() -> tuple[SentenceEncoder, WordPieceTokenizer]:
    loaded = load_checkpoint(SHIPPED)
    tokenizer = load_fusion_sentence_tokenizer(SHIPPED, loaded.manifest)
    encoder = getattr(loaded.model, "sentence_encoder", None)
    if tokenizer is None or encoder is None:
        pytest.fail("the shipped mvsa-fusion checkpoint has no sentence encoder")
    return encoder, tokenizer


def test_wordpiece_gives_the_reference_tokenizers_ids(pairs_subset: Path) -> None:
    """Same ids as Hugging Face ``tokenizers`` (BertNormalizer + BertPreTokenizer + WordPiece) on the
    shipped MiniLM vocabulary, over real tweets and strings that exercise every normalisation rule."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    _, ours = _shipped_sentence()
    vocabulary = {token: index for index, token in enumerate(ours.itos)}
    reference = Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]", max_input_chars_per_word=100))
    reference.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                      lowercase=True)
    reference.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    reference.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocabulary["[CLS]"]), ("[SEP]", vocabulary["[SEP]"])])
    tweets = [json.loads(line)["text"] for line in (pairs_subset / "train.jsonl").read_text().splitlines()]
    texts = TRICKY + tweets
    mismatched = [text for text in texts if reference.encode(text).ids != ours.encode(text)]
    assert not mismatched, mismatched[:3]
    assert ours.encode("x" * 150) == [vocabulary["[CLS]"], vocabulary["[UNK]"], vocabulary["[SEP]"]]
    assert len(ours.encode("word " * 1000)) == ours.max_tokens == 256


def test_wordpiece_reads_long_text_in_blocks_with_the_whole_texts_ids() -> None:
    """Blocks are cut at any character the tokenizer reads as whitespace (tab, NBSP, U+3000, ...), never
    inside a word nor at a control character that cleaning drops (U+001C): the ids of the whole text."""
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "shuttle", "launch", "##es", "orbit", "ab", "##cd", "."]
    tokenizer = WordPieceTokenizer(vocabulary, max_tokens=8192)

    def whole(text: str) -> list[int]:
        pieces = [p for word in tokenizer.split_words(tokenizer.normalize(text)) for p in tokenizer.word_pieces(word)]
        return [tokenizer.stoi["[CLS]"], *pieces[: tokenizer.max_tokens - 2], tokenizer.stoi["[SEP]"]]

    words = ["shuttle", "launches", "orbit.", "abcd"]
    for separator in ("\t", "\u00a0", "\u3000", "\u2003", "\r\n", "\x1c\t"):
        text = separator.join(words[i % 4] for i in range(3000))  # over 20,000 characters, no plain space
        assert len(text) > 4 * 2048 and tokenizer.encode(text) == whole(text), repr(separator)


def test_the_shipped_encoder_reproduces_all_minilm_l6_v2() -> None:
    """First dimensions and cosines of sentence-transformers' all-MiniLM-L6-v2 embeddings (float32), recorded
    from that library; the checkpoint stores the weights in float16, hence the tolerance."""
    encoder, tokenizer = _shipped_sentence()
    expected = torch.tensor([[0.00269, 0.07274, 0.10562, -0.03227, -0.00771, 0.00459, 0.0411, -0.01519],
                             [0.04431, -0.09051, 0.08774, 0.00025, 0.05578, 0.015, 0.05418, -0.05709],
                             [-0.00994, 0.11627, -0.02377, 0.02518, -0.069, 0.0159, 0.02026, -0.0545]])
    ids = collate_ids(tokenizer, TRICKY[:3])
    with torch.no_grad():
        embeddings = encoder(ids)  # (3, 384)
    assert embeddings.shape == (3, 384)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(embeddings[:, :8], expected, atol=2e-3), embeddings[:, :8]
    cosines = embeddings @ embeddings.T
    assert torch.allclose(cosines[0, 1:], torch.tensor([0.2264, 0.18212]), atol=2e-3)
    assert float(cosines[1, 2]) == pytest.approx(0.09792, abs=2e-3)


def collate_ids(tokenizer: WordPieceTokenizer, texts: list[str]) -> torch.Tensor:
    rows = tokenizer.encode_batch(texts)
    batch = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for index, row in enumerate(rows):
        batch[index, : len(row)] = row
    return batch


def test_padding_does_not_move_an_embedding_and_an_empty_row_stays_finite() -> None:
    torch.manual_seed(0)
    encoder = SentenceEncoder(SentenceEncoderConfig(vocab_size=40, hidden=16, layers=2, heads=4, intermediate=32,
                                                    max_positions=32)).eval()
    alone = torch.tensor([[2, 7, 8, 9, 3]])
    padded = torch.tensor([[2, 7, 8, 9, 3, 0, 0, 0], [2, 5, 3, 0, 0, 0, 0, 0], [0] * 8])
    with torch.no_grad():
        single, batch = encoder(alone), encoder(padded)
    assert torch.allclose(single[0], batch[0], atol=1e-5)
    assert bool(batch.isfinite().all())
    # float16 storage: the state dict is half precision, and it loads back into float32
    state = encoder.state_dict()
    assert {value.dtype for value in state.values()} == {torch.float16}
    copy = SentenceEncoder(encoder.config)
    copy.load_state_dict(state)
    assert next(copy.parameters()).dtype == torch.float32


def test_reading_a_sentence_source_checks_what_it_cannot_reproduce(sentence_source: Path, tmp_path: Path) -> None:
    source = load_sentence_source(sentence_source)
    assert source.config.hidden == 16 and source.lineage["sha256"] == sha256_file(sentence_source / "model.safetensors")
    assert "pooler.dense.weight" not in source.state
    with pytest.raises(SentenceSourceError, match="not a folder"):
        load_sentence_source(tmp_path / "missing")
    broken = shutil.copytree(sentence_source, tmp_path / "max-pooled")
    (broken / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(SentenceSourceError, match="mean pooling"):
        load_sentence_source(broken)
    cased = shutil.copytree(sentence_source, tmp_path / "cased")
    (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    with pytest.raises(SentenceSourceError, match="uncased"):
        load_sentence_source(cased)
    pickled = shutil.copytree(sentence_source, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(SentenceSourceError, match="safetensors"):
        load_sentence_source(pickled)
    short = write_sentence_source(tmp_path / "short-vocab", ["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    (short / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    with pytest.raises(SentenceSourceError, match=r"vocab\.txt has 2 tokens"):
        load_sentence_source(short)


def test_late_fusion_with_a_sentence_encoder_trains_ships_and_serves_it(
    pairs_subset: Path, fastconv_checkpoint: Path, ngram_text_checkpoint: Path, sentence_source: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "fusion-sentence"
    assert main(["finetune-fusion", "--data", str(pairs_subset), "--output", str(output), "--image-from",
                 str(fastconv_checkpoint), "--text-from", str(ngram_text_checkpoint), "--sentence-from",
                 str(sentence_source), "--epochs", "5", "--folds", "3"]) == 0
    loaded = load_checkpoint(output)
    manifest = loaded.manifest
    assert manifest.parent is not None and set(manifest.parent) == {"image", "text", "sentence"}
    assert manifest.parent["sentence"]["sha256"] == sha256_file(sentence_source / "model.safetensors")
    assert manifest.preprocessing["sentence"]["kind"] == "wordpiece"
    # the encoder really is the source's (as stored: float16), frozen, and the scorer on it was fitted
    source = load_sentence_source(sentence_source)
    encoder = loaded.model.sentence_encoder
    for key, value in source.state.items():
        assert torch.equal(encoder.state_dict()[key].float(), value.half().float()), key
    assert float(loaded.model.sentence_scorer.weight.detach().abs().sum()) > 0
    assert manifest.metrics["validation"]["sentence_scorer"] == {"C": 0.3, "folds": 3}

    # the service's path: both tokenisations, a pair without text, and the model needs its WordPiece ids
    image_pre, _ = fusion_preprocessing(manifest)
    tokenizer = load_fusion_sentence_tokenizer(output, manifest)
    assert tokenizer is not None and tokenizer.itos == source.tokenizer.itos
    from models.fusion import load_fusion_text_encoder

    encoder_text = load_fusion_text_encoder(output, manifest)
    data = load_pairs(pairs_subset, image_pre.size, cache_dir=None)
    ids = encoder_text.encode(data.texts[:3])
    pieces = tokenizer.encode_batch(data.texts[:3])
    batch = collate_fusion_batch([data.images[0], data.images[1], data.images[2]],
                                 [ids[0][ids[0] > 0], ids[1][ids[1] > 0], None],
                                 image_pre, sentence_ids=pieces)
    assert batch["sentence_ids"].shape[0] == 3 and not bool(batch["sentence_ids"][2].any())  # no text: all padding
    with torch.no_grad():
        probabilities = (loaded.model(**batch) / manifest.temperature).softmax(dim=1)
        assert probabilities.shape == (3, 3) and torch.allclose(probabilities.sum(dim=1), torch.ones(3))
        without = {key: value for key, value in batch.items() if key != "sentence_ids"}
        with pytest.raises(FusionInputError, match="sentence_ids"):
            loaded.model(**without)
        images_only = loaded.model(images=batch["images"][:1])  # no text anywhere: no WordPiece ids needed
    assert images_only.shape == (1, 3)

    assert main(["finetune-fusion", "--data", str(pairs_subset), "--output", str(tmp_path / "joint"), "--arch", "joint",
                 "--sentence-from", str(sentence_source)]) == 2
    assert "--sentence-from is for late fusion" in capsys.readouterr().err
