"""Short real runs: the default text recipe beats chance on a small 20 Newsgroups subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.text_encoding import load_text_encoder
from training.cli import main
from training.engine.adaptive import stratified_folds


@pytest.fixture(scope="module")
def ngram_checkpoint(news_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "text-ngram"
    assert main(["train-text", "--data", str(news_subset), "--output", str(output), "--validation-fraction", "0.25",
                 "--max-char-ngrams", "20000", "--calibration-folds", "0"]) == 0
    return output


def test_default_text_recipe_beats_chance_and_is_calibrated_on_a_real_subset(ngram_checkpoint: Path) -> None:
    loaded = load_checkpoint(ngram_checkpoint)
    manifest = loaded.manifest
    validation = manifest.metrics["validation"]
    assert manifest.architecture == "ngram_bag" and len(manifest.classes) == 4
    assert validation["accuracy"] > 0.6  # chance is 0.25
    assert validation["validation_posts"] == 80 and manifest.calibration["temperature"] > 0
    assert manifest.preprocessing["header_fields"] == ["subject", "from", "organization"]


def test_served_encoder_and_model_reproduce_the_validation_predictions(ngram_checkpoint: Path, news_subset: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_checkpoint(ngram_checkpoint)
    encoder = load_text_encoder(ngram_checkpoint, loaded.manifest)
    post = (news_subset / "sci.space").iterdir().__next__().read_bytes().decode("latin-1")
    logits = loaded.model(token_ids=encoder.encode([post]))
    assert loaded.manifest.classes[int(logits.argmax())] == "sci.space"  # a training post: surely right
    assert main(["evaluate", str(ngram_checkpoint), "--data", str(news_subset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 320 and report["accuracy"] > 0.8


@pytest.mark.parametrize("arch, extra", [
    ("bilstm", ["--config", "hidden_size=16", "--config", "embedding_dim=16"]),
    ("trunk", ["--config", "dim=32", "--config", "depth=1", "--config", "heads=2"]),
])
def test_sequence_text_models_train_and_write_a_loadable_checkpoint(arch: str, extra: list[str], news_subset: Path,
                                                                   tmp_path: Path) -> None:
    output = tmp_path / arch
    assert main(["train-text", "--arch", arch, "--data", str(news_subset), "--output", str(output), "--epochs", "1",
                 "--max-tokens", "48", "--batch-size", "32", "--device", "cpu", *extra]) == 0
    loaded = load_checkpoint(output)
    assert loaded.manifest.architecture == arch and loaded.manifest.preprocessing["max_tokens"] == 48
    encoder = load_text_encoder(output, loaded.manifest)
    assert loaded.model(token_ids=encoder.encode(["The shuttle orbit", ""])).shape == (2, 4)


def test_stratified_folds_cover_every_post_once_and_balance_each_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    fold_of = stratified_folds(labels, 3, seed=0)
    assert fold_of.shape == labels.shape and set(fold_of.tolist()) == {0, 1, 2}
    for label in (0, 1, 2):
        counts = torch.bincount(fold_of[labels == label], minlength=3)
        assert int(counts.max() - counts.min()) <= 1
    assert torch.equal(fold_of, stratified_folds(labels, 3, seed=0))
    with pytest.raises(ValueError, match="at least 2 folds"):
        stratified_folds(labels, 1, seed=0)


def test_cross_fitted_calibration_scores_every_post_out_of_fold(news_subset: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "text-crossfit"
    assert main(["train-text", "--data", str(news_subset), "--output", str(output), "--max-char-ngrams", "20000",
                 "--refit-full", "--calibration-folds", "3"]) == 0
    manifest = load_checkpoint(output).manifest
    validation = manifest.metrics["validation"]
    # every one of the 320 posts scored by a model that did not see it: the accuracy is an honest one
    assert validation["count"] == 320 and validation["validation_posts"] == 320 and validation["train_posts"] == 320
    assert 0.6 < validation["accuracy"] < 1.0 and validation["calibration_folds"] == 3
    assert manifest.calibration["nll_after"] <= manifest.calibration["nll_before"]
    assert manifest.config["score_power"] == validation["score_power"] >= 1.0  # fitted with the temperature
    assert main(["train-text", "--data", str(news_subset), "--output", str(tmp_path / "x"), "--calibration-folds", "3",
                 "--label-fraction", "0.5"]) == 2
    assert "train on every label" in capsys.readouterr().err
