"""A tiny sentence encoder in the sentence-transformers folder layout, for the fusion tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_sentence_source(folder: Path, vocabulary: list[str], seed: int = 13) -> Path:
    """A tiny random BERT sentence encoder in the sentence-transformers folder layout (as MiniLM ships)."""
    from safetensors.torch import save_file

    from models.sentence_encoder import SentenceEncoder, SentenceEncoderConfig

    torch.manual_seed(seed)
    config = SentenceEncoderConfig(vocab_size=len(vocabulary), hidden=16, layers=1, heads=2, intermediate=32,
                                   max_positions=64, weight_dtype="float32")
    state = SentenceEncoder(config).state_dict()
    state["pooler.dense.weight"] = torch.randn(16, 16)  # what a BertModel also has; not used
    (folder / "1_Pooling").mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_act": "gelu", "vocab_size": len(vocabulary), "hidden_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12}))
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return folder

