"""The fusion architectures and their input contract: shapes, absent modalities, the service's collate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model
from models.checkpoint import load_checkpoint, new_manifest, save_checkpoint
from models.fusion import FUSION_INPUTS, FusionInputError, collate_fusion_batch, fusion_preprocessing
from models.preprocessing import ImagePreprocessing
from models.registry import available_models

TINY_LATE = {"num_classes": 3, "image": {"widths": [8, 16, 16]},
             "text": {"vocab_size": 50, "num_classes": 3, "max_tokens": 16}}
TINY_JOINT = {"num_classes": 3, "dim": 32, "depth": 1, "heads": 2, "patch_size": 8, "stem_width": 8,
              "vocab_size": 50, "max_text_tokens": 16}
TINY_IMAGE = ImagePreprocessing(size=8, mean=(0.5,) * 3, std=(0.25,) * 3)


def _randomised(architecture: str, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(architecture, config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    return model.eval()


def _inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(2, 50, (batch, 7), generator=generator)


def test_both_architectures_are_registered_and_documented() -> None:
    assert {"fusion_late", "fusion_joint"} <= set(available_models())
    assert "image_mask" in FUSION_INPUTS and "text_mask" in FUSION_INPUTS


@pytest.mark.parametrize(("architecture", "config"), [("fusion_late", TINY_LATE), ("fusion_joint", TINY_JOINT)])
def test_an_absent_side_is_ignored_whatever_its_tensor_holds(architecture: str, config: dict) -> None:
    model = _randomised(architecture, config)
    images, token_ids = _inputs()
    image_mask = torch.tensor([True, False, True, True])
    text_mask = torch.tensor([True, True, False, True])
    with torch.no_grad():
        logits = model(images, token_ids, image_mask, text_mask)
        other = model(torch.randn_like(images) * 5, torch.randint(2, 50, token_ids.shape), image_mask, text_mask)
        alone_text = model(None, token_ids[1:2])  # the text of pair 1 on its own
        alone_image = model(images[2:3], None)
    assert logits.shape == (4, 3)
    assert not torch.allclose(logits[0], other[0])  # present sides do matter
    torch.testing.assert_close(logits[1], alone_text[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[2], alone_image[0], atol=1e-5, rtol=1e-5)
    changed_absent = model(images.clone().index_fill_(0, torch.tensor([1]), 3.0),
                           token_ids.clone().index_fill_(0, torch.tensor([2]), 7), image_mask, text_mask)
    torch.testing.assert_close(changed_absent[1:3], logits[1:3], atol=1e-5, rtol=1e-5)


def test_forward_needs_at_least_one_modality() -> None:
    model = _randomised("fusion_late", TINY_LATE)
    with pytest.raises(FusionInputError, match="need images or token_ids"):
        model(None, None)


def test_collate_builds_the_documented_tensors() -> None:
    image = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    batch = collate_fusion_batch([image, None, image], [torch.tensor([5, 6, 7]), torch.tensor([9]), None], TINY_IMAGE)
    assert batch["images"].shape == (3, 3, 8, 8) and batch["images"].dtype == torch.float32
    assert batch["token_ids"].tolist() == [[5, 6, 7], [9, 0, 0], [0, 0, 0]]
    assert batch["image_mask"].tolist() == [True, False, True]
    assert batch["text_mask"].tolist() == [True, True, False]
    assert float(batch["images"][1].abs().sum()) == 0.0
    torch.testing.assert_close(batch["images"][0, 0, 0, 0], torch.tensor((128 - 127.5) / 63.75))


def test_collate_refuses_unpaired_or_empty_input() -> None:
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(FusionInputError, match="2 image slots but 1 text slots"):
        collate_fusion_batch([image, image], [None], TINY_IMAGE)
    with pytest.raises(FusionInputError, match="pair 1 has neither an image nor a text"):
        collate_fusion_batch([image, None], [None, None], TINY_IMAGE)
    with pytest.raises(FusionInputError, match="pair 1 has neither an image nor a text"):  # no tokens is no text
        collate_fusion_batch([image, None], [None, torch.tensor([], dtype=torch.long)], TINY_IMAGE)
    with pytest.raises(FusionInputError, match="no pairs"):
        collate_fusion_batch([], [], TINY_IMAGE)
    with pytest.raises(FusionInputError, match=r"expected \(3, 8, 8\)"):
        collate_fusion_batch([torch.zeros(3, 4, 4, dtype=torch.uint8)], [None], TINY_IMAGE)


def test_a_multimodal_checkpoint_round_trips(tmp_path: Path) -> None:
    model = _randomised("fusion_late", TINY_LATE)
    preprocessing = {"kind": "multimodal", "image": {"kind": "image", "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
                     "text": {"kind": "text", "vocab_file": "vocab.json"}}
    manifest = new_manifest("pairs", "multimodal", "fusion_late", model.config, classes=["a", "b", "c"],  # type: ignore[arg-type]
                            preprocessing=preprocessing)
    save_checkpoint(tmp_path / "ck", model, manifest)
    loaded = load_checkpoint(tmp_path / "ck")
    images, token_ids = _inputs()
    torch.testing.assert_close(loaded.model(images, token_ids), model(images, token_ids))
    image, text = fusion_preprocessing(loaded.manifest)
    assert image == ImagePreprocessing(32, (0.5,) * 3, (0.25,) * 3) and text["vocab_file"] == "vocab.json"


def test_lexicon_features_sum_valences_and_flip_them_after_a_negator() -> None:
    from training.fusion.lexicon import lexicon_tables, read_vader_lexicon

    itos = ["<pad>", "<unk>", "good", "not", "day", "awful", "#happy", ":)"]
    model = build_model("fusion_late", {**TINY_LATE, "text": {"vocab_size": len(itos), "num_classes": 3, "max_tokens": 16},
                                        "lexicon": True}).eval()
    valence, negator = lexicon_tables(itos, read_vader_lexicon())
    assert valence[2] > 0 and valence[5] < 0 and valence[6] > 0 and valence[7] > 0  # words, hashtags, emoticons
    assert negator.tolist() == [i == 3 for i in range(len(itos))] and valence[:2].eq(0).all()
    model.valence.copy_(valence)
    model.negator.copy_(negator)
    texts = torch.tensor([[2, 4, 0, 0], [3, 2, 4, 0], [5, 4, 4, 0], [3, 4, 4, 4]])  # good day · not good day · awful · not …
    features = model.lexicon_features(texts)  # (4, 5)
    assert features.shape == (4, 5)
    compound = features[:, 0]
    assert compound[0] > 0 > compound[1] and compound[2] < 0 and compound[3] == 0
    assert features[1, 3] == 0 and features[1, 4] > 0  # the negated "good" counts as negative
    assert model.text_scores(texts).shape == (4, model.text_width) and model.text_width == 3 + 5
