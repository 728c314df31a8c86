"""The fusion encoders really start from the pretrained checkpoints (tensor by tensor), and lineage is kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import load_state_dict
from training.fusion.joint import build_joint
from training.fusion.late import build_late, train_late_head
from training.fusion.prep import FusionOptions, prepare
from training.fusion.transfer import TransferError, load_image_parent, load_text_parent


def _options(data: Path, **values: object) -> FusionOptions:
    return FusionOptions(data=data, limit=200, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def late_prepared(pairs_subset: Path, fastconv_checkpoint: Path, ngram_text_checkpoint: Path):  # type: ignore[no-untyped-def]
    options = _options(pairs_subset, image_from=fastconv_checkpoint, text_from=ngram_text_checkpoint)
    return prepare(options), options


def test_late_encoders_are_copies_of_the_image_and_text_checkpoints(late_prepared, fastconv_checkpoint: Path,  # type: ignore[no-untyped-def]
                                                                    ngram_text_checkpoint: Path) -> None:
    prep, options = late_prepared
    encoded = build_late(prep, options, seed=0)
    state = encoded.model.state_dict()
    image_state, _ = load_state_dict(fastconv_checkpoint)
    copied_image = [name for name in image_state if not name.startswith("head.")]
    assert copied_image and all(torch.equal(state[f"image_encoder.{name}"], image_state[name]) for name in copied_image)
    text_state, _ = load_state_dict(ngram_text_checkpoint)
    assert all(torch.equal(state[f"topic.{name}"], text_state[name]) for name in text_state)
    assert sorted(encoded.copied["image"]) == sorted(f"image_encoder.{n}" for n in copied_image)


def test_the_fusion_vocabulary_extends_the_text_checkpoints_with_unchanged_ids(late_prepared) -> None:  # type: ignore[no-untyped-def]
    prep, _ = late_prepared
    parent = prep.text_parent.encoder.vocabulary
    assert prep.vocabulary.itos[: len(parent)] == parent.itos
    assert len(prep.vocabulary) > len(parent)  # the tweets' own words are appended
    assert prep.preprocessing.header_fields == ()  # a tweet has no header lines to tag
    assert prep.preprocessing.lowercase == prep.text_parent.encoder.preprocessing.lowercase


def test_joint_trunk_and_image_adapter_are_copies_of_the_image_trunk(pairs_subset: Path, trunk_checkpoint: Path) -> None:
    options = _options(pairs_subset, arch="joint", image_from=trunk_checkpoint)
    model, copied = build_joint(prepare(options), seed=0)
    parent, _ = load_state_dict(trunk_checkpoint)
    state = model.state_dict()
    shared = [name for name in parent if name.startswith(("trunk.", "adapters.image."))]
    assert shared and all(torch.equal(state[name], parent[name]) for name in shared)
    assert state["head.weight"].shape[0] == 3  # a fresh head for the three sentiment classes
    assert len(copied["joint"]) == len(shared)


def test_parents_of_the_wrong_kind_are_refused_clearly(fastconv_checkpoint: Path, trunk_checkpoint: Path,
                                                       ngram_text_checkpoint: Path) -> None:
    with pytest.raises(TransferError, match="needs one of \\['trunk'\\]"):
        load_image_parent(fastconv_checkpoint, ("trunk",))
    with pytest.raises(TransferError, match="--image-from needs an image checkpoint"):
        load_image_parent(ngram_text_checkpoint, ("fastconv",))
    with pytest.raises(TransferError, match="--text-from needs a text checkpoint"):
        load_text_parent(trunk_checkpoint)


def test_pairs_missing_a_side_train_and_predict(pairs_subset: Path, fastconv_checkpoint: Path, tmp_path: Path) -> None:
    import json

    rows = [json.loads(line) for line in (pairs_subset / "train.jsonl").read_text().splitlines()]
    for row in rows[:30]:
        row["image"] = None
    for row in rows[30:60]:
        row["text"] = ""
    (tmp_path / "images").symlink_to(pairs_subset / "images")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = FusionOptions(data=tmp_path, image_from=fastconv_checkpoint, limit=300, loop={"epochs": 2})
    prep = prepare(options)
    assert int((~prep.data.has_image).sum()) == 30 and int((~prep.data.has_text).sum()) == 30
    encoded = build_late(prep, options, seed=0)
    _, logits = train_late_head(encoded, prep, options, 0, torch.device("cpu"))
    assert logits["fused"].shape == (len(prep.val_idx), 3) and torch.isfinite(logits["fused"]).all()


def test_joint_fusion_sets_aside_a_text_checkpoint_without_a_text_adapter(pairs_subset: Path, trunk_checkpoint: Path,
                                                                          ngram_text_checkpoint: Path) -> None:
    options = _options(pairs_subset, arch="joint", image_from=trunk_checkpoint, text_from=ngram_text_checkpoint)
    prep = prepare(options)
    assert prep.text_parent is None and prep.image_parent is not None
    assert "subject:space" not in prep.vocabulary.stoi  # the vocabulary comes from the training texts alone
