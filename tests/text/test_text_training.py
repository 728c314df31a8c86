"""Short real runs: the default text recipe beats chance on a small 20 Newsgroups subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint
from models.text_encoding import load_text_encoder
from training.cli import main


@pytest.fixture(scope="module")
def ngram_checkpoint(news_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "text-ngram"
    assert main(["train-text", "--data", str(news_subset), "--output", str(output), "--validation-fraction", "0.25",
                 "--max-char-ngrams", "20000"]) == 0
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
