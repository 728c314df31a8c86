"""Image training end to end on a small real subset: learning, resuming, DDP, fine-tuning, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, read_manifest
from training.cli import main

ROOT = Path(__file__).resolve().parents[3]
SMALL_CONV = ["--config", "widths=[16,32,32]", "--batch-size", "50", "--lr", "0.8"]


def _train(data: Path, output: Path, *extra: str) -> int:
    return main(["pretrain-image", "--data", str(data), "--output", str(output), *SMALL_CONV, *extra])


def test_short_run_beats_chance_and_writes_a_complete_checkpoint(cifar_subset: Path, tmp_path: Path) -> None:
    assert _train(cifar_subset, tmp_path / "conv", "--epochs", "8") == 0
    manifest = read_manifest(tmp_path / "conv")
    validation = manifest.metrics["validation"]
    assert validation["accuracy"] > 0.2  # chance is 0.1
    assert manifest.classes == sorted(p.name for p in cifar_subset.iterdir())
    assert manifest.calibration["nll_after"] <= manifest.calibration["nll_before"] + 1e-4  # T minimises validation NLL
    assert manifest.preprocessing["size"] == 32 and len(manifest.preprocessing["mean"]) == 3
    assert manifest.training_command.startswith("python -m training pretrain-image")
    assert len(manifest.data_fingerprint) == 64
    assert (tmp_path / "conv.confusion.png").stat().st_size > 1000
    assert (tmp_path / "conv.curves.png").stat().st_size > 1000
    assert not (tmp_path / ".conv.train-state").exists()


def test_training_is_reproducible_and_resumes_after_a_kill(cifar_subset: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "training", "pretrain-image", "--data", str(cifar_subset), *SMALL_CONV,
               "--epochs", "3", "--save-every-steps", "2", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run([*command, "--output", str(tmp_path / "straight")], cwd=ROOT, env=env,
                          capture_output=True, check=False).returncode == 0
    process = subprocess.Popen([*command, "--output", str(tmp_path / "killed")], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".killed.train-state" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() or json.loads(state.read_text())["progress"]["epoch"] < 1:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-epoch 2: the state is at least one epoch old
    process.wait()
    assert not (tmp_path / "killed").exists()
    resumed = subprocess.run([*command, "--output", str(tmp_path / "killed")], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    straight, killed = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "killed")
    for key, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(killed.model.state_dict()[key], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_trains_with_two_gloo_processes(cifar_subset: Path, tmp_path: Path) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "training", "pretrain-image", "--data", str(cifar_subset),
         "--output", str(tmp_path / "ddp"), *SMALL_CONV, "--epochs", "2", "--device", "cpu"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = read_manifest(tmp_path / "ddp")
    assert manifest.metrics["validation"]["count"] == 60
    load_checkpoint(tmp_path / "ddp")


def test_finetune_image_gives_a_new_head_and_records_lineage(cifar_subset: Path, tmp_path: Path) -> None:
    assert _train(cifar_subset, tmp_path / "source", "--epochs", "1") == 0
    own = tmp_path / "own"
    for name in ("cat", "dog", "ship"):
        shutil.copytree(cifar_subset / name, own / name)
    assert main(["finetune-image", "--from", str(tmp_path / "source"), "--data", str(own),
                 "--output", str(tmp_path / "tuned"), "--epochs", "2", "--batch-size", "30"]) == 0
    tuned = load_checkpoint(tmp_path / "tuned")
    assert tuned.manifest.classes == ["cat", "dog", "ship"]
    assert tuned.model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    source = read_manifest(tmp_path / "source")
    assert tuned.manifest.parent is not None
    assert tuned.manifest.parent["weights_sha256"] == source.weights_sha256


def test_evaluate_prints_metrics_as_json(cifar_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(cifar_subset, tmp_path / "conv", "--epochs", "1") == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "conv"), "--data", str(cifar_subset), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 600
    assert set(metrics["per_class_accuracy"]) == set(read_manifest(tmp_path / "conv").classes)
    assert len(metrics["confusion_matrix"]) == 10


def test_missing_data_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path / "nowhere", tmp_path / "out") == 2
    assert "nowhere: no such directory" in capsys.readouterr().err


def test_empty_class_folder_is_a_clear_error(cifar_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(cifar_subset / "cat", data / "cat")
    (data / "dog").mkdir()
    assert _train(data, tmp_path / "out") == 2
    assert "class folder 'dog' holds no images" in capsys.readouterr().err


def test_unreadable_image_is_a_clear_error(cifar_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(cifar_subset / "cat", data / "cat")
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert _train(data, tmp_path / "out") == 2
    assert "broken.jpg: unreadable image" in capsys.readouterr().err


def test_refit_full_trains_on_every_image_and_takes_over_the_tuning_runs_calibration(
        cifar_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(cifar_subset, tmp_path / "tuned", "--epochs", "2") == 0
    tuned = read_manifest(tmp_path / "tuned")
    assert _train(cifar_subset, tmp_path / "full", "--epochs", "2", "--refit-full",
                  "--calibration-from", str(tmp_path / "tuned")) == 0
    full = load_checkpoint(tmp_path / "full")
    validation = full.manifest.metrics["validation"]
    images = sum(1 for path in cifar_subset.rglob("*") if path.is_file())
    assert validation["train_images"] == images and validation["validation_images"] == 0
    assert validation["train_images"] > tuned.metrics["validation"]["train_images"]
    assert full.manifest.calibration == tuned.calibration
    assert validation["accuracy"] == tuned.metrics["validation"]["accuracy"]
    assert validation["measured_on"]["weights_sha256"] == tuned.weights_sha256
    assert full.manifest.weights_sha256 != tuned.weights_sha256
    assert full.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert (tmp_path / "full.curves.png").stat().st_size > 1000
    # a refit needs a matching tuning run
    capsys.readouterr()
    assert _train(cifar_subset, tmp_path / "bad", "--epochs", "1", "--refit-full") != 0
    assert "--calibration-from" in capsys.readouterr().err
    assert _train(cifar_subset, tmp_path / "bad", "--epochs", "1", "--refit-full", "--arch", "lenet",
                  "--calibration-from", str(tmp_path / "tuned")) != 0
    assert "not image/lenet" in capsys.readouterr().err


def test_fine_tuning_starts_from_a_quarter_of_the_transfer_recipe_rate_unless_lr_is_given(tmp_path: Path) -> None:
    from training.image.task import IMAGE_RECIPES, TRANSFER_RECIPES, ImageRunOptions, _recipe

    options = ImageRunOptions(data=tmp_path, output=tmp_path / "out")
    pretraining = _recipe(options, "fastconv", transfer=False)[0]
    assert (pretraining.optimizer, pretraining.lr) == ("muon", IMAGE_RECIPES["fastconv"].loop["lr"])
    transfer = _recipe(options, "fastconv", transfer=True)[0]
    assert (transfer.optimizer, transfer.lr) == ("sgd", TRANSFER_RECIPES["fastconv"].loop["lr"] / 4)
    assert _recipe(options, "trunk", transfer=True)[0].lr == IMAGE_RECIPES["trunk"].loop["lr"] / 4
    given = ImageRunOptions(data=tmp_path, output=tmp_path / "out", loop={"lr": 0.05})
    assert _recipe(given, "fastconv", transfer=True)[0].lr == 0.05


# The command line that reproduces the bundled SGD-trained runs (docs/results.md) under the Muon default.
SGD_RECIPE_FLAGS = ["--optimizer", "sgd", "--lr", "0.4", "--batch-size", "512", "--weight-decay", "5e-4",
                    "--warmup-fraction", "0.25", "--config", "identity_init=false"]


def test_the_documented_flags_rebuild_the_previous_sgd_recipe(tmp_path: Path) -> None:
    from training.cli import build_parser
    from training.engine.options import run_options_from_args
    from training.image.task import TRANSFER_RECIPES, ImageRunOptions, _recipe, image_recipe

    args = build_parser().parse_args(["pretrain-image", "--data", str(tmp_path), "--output", str(tmp_path / "o"),
                                      *SGD_RECIPE_FLAGS])
    options = ImageRunOptions(**run_options_from_args(args), model_config=dict(args.config))
    loop, batch_size, flip = _recipe(options, "fastconv", transfer=False)
    previous = TRANSFER_RECIPES["fastconv"]  # the SGD recipe, kept for fine-tuning
    assert loop == previous.loop_config(0)
    assert (batch_size, flip) == (previous.batch_size, previous.extra["flip"])
    assert image_recipe(options, "fastconv").model == {"tta_translate": True, "identity_init": False}
