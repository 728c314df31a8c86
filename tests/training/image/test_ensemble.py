"""``ensemble-image`` end to end on a small real subset: the joined model, its lineage and calibration,
what it refuses (members of other splits, data, recipes; the same run twice), and its export."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from models.calibration import Calibration
from models.checkpoint import load_checkpoint, read_manifest
from training.cli import main

BETA_MAP = {"log_top_weight": 0.8, "log_rest_weight": 1.3, "intercept": -0.3}
SMALL_CONV = ["--config", "widths=[16,32,32]", "--batch-size", "50", "--lr", "0.8", "--epochs", "2"]


@pytest.fixture(scope="module")
def members(cifar_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs of one recipe on one split (seeds 0 and 1), and one on another split (seed 2)."""
    root = tmp_path_factory.mktemp("members")
    runs = {"a": ["--seed", "0"], "b": ["--seed", "1", "--split-seed", "0"], "other-split": ["--seed", "2"]}
    for name, seeds in runs.items():
        assert main(["pretrain-image", "--data", str(cifar_subset), "--output", str(root / name), *SMALL_CONV,
                     *seeds]) == 0
    return {name: root / name for name in runs}


def _ensemble(members: list[Path], data: Path, output: Path, *extra: str) -> int:
    return main(["ensemble-image", *map(str, members), "--data", str(data), "--output", str(output), *extra])


def test_the_ensemble_is_its_members_mean_calibrated_on_their_shared_split(
        members: dict[str, Path], cifar_subset: Path, tmp_path: Path) -> None:
    assert read_manifest(members["b"]).metrics["validation"]["split"] == {"fraction": 0.1, "seed": 0}
    assert _ensemble([members["a"], members["b"]], cifar_subset, tmp_path / "joined", "--views", "flip-translate") == 0
    joined = load_checkpoint(tmp_path / "joined")
    manifest = joined.manifest
    assert manifest.architecture == "image_ensemble" and manifest.config["members"] == 2
    assert manifest.config["member_config"]["tta_translate"] is True
    assert manifest.preprocessing["mean"] == pytest.approx(read_manifest(members["a"]).preprocessing["mean"], rel=1e-5)
    assert manifest.parent is not None
    assert [member["weights_sha256"] for member in manifest.parent["members"]] == [
        read_manifest(members[name]).weights_sha256 for name in ("a", "b")]
    validation = manifest.metrics["validation"]
    assert validation["count"] == 60 and validation["split"] == {"fraction": 0.1, "seed": 0}
    assert [member["name"] for member in validation["members"]] == ["a", "b"]
    assert set(manifest.calibration["ece_out_of_fold"]) == {"temperature", "top_label"}
    Calibration.from_manifest(manifest.calibration)  # what the service will load

    images = torch.randn(4, 3, 32, 32)
    singles = [load_checkpoint(members[name]).model.eval() for name in ("a", "b")]
    for single in singles:
        single.config.tta_translate = True
    with torch.no_grad():
        expected = torch.stack([single(images) for single in singles]).mean(dim=0)
        assert torch.allclose(joined.model.eval()(images), expected, atol=1e-5)


def test_evaluate_scores_the_ensemble_with_its_calibration(members: dict[str, Path], cifar_subset: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _ensemble([members["a"], members["b"]], cifar_subset, tmp_path / "joined") == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "joined"), "--data", str(cifar_subset), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 600 and 0 <= metrics["ece"] <= 1


@pytest.mark.parametrize(("names", "message"), [
    (["a"], "an ensemble needs 2 to 8 members, got 1"),
    (["a", "a"], "the same weights are named twice"),
    (["a", "other-split"], "differ in preprocessing, validation split"),
])
def test_members_that_cannot_be_one_model_are_refused(members: dict[str, Path], cifar_subset: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], names: list[str],
                                                      message: str) -> None:
    assert _ensemble([members[name] for name in names], cifar_subset, tmp_path / "joined") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "joined").exists()


def test_a_refit_member_is_refused(members: dict[str, Path], cifar_subset: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    refit = tmp_path / "refit"
    shutil.copytree(members["b"], refit)
    manifest = json.loads((refit / "manifest.json").read_text())
    manifest["metrics"]["validation"]["refit_full"] = True  # trained on every image, its split included
    (refit / "manifest.json").write_text(json.dumps(manifest))
    assert _ensemble([members["a"], refit], cifar_subset, tmp_path / "joined") == 2
    assert "is a refit on every image: it has no validation split to share" in capsys.readouterr().err


def test_other_data_than_the_members_saw_is_refused(members: dict[str, Path], cifar_subset: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    shutil.copytree(cifar_subset, other)
    next((other / "cat").iterdir()).unlink()
    assert _ensemble([members["a"], members["b"]], other, tmp_path / "joined") == 2
    assert "is not the data the members were trained on" in capsys.readouterr().err


def test_an_ensemble_is_not_a_fine_tuning_source(members: dict[str, Path], cifar_subset: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert _ensemble([members["a"], members["b"]], cifar_subset, tmp_path / "joined") == 0
    capsys.readouterr()
    assert main(["finetune-image", "--from", str(tmp_path / "joined"), "--data", str(cifar_subset),
                 "--output", str(tmp_path / "tuned")]) == 2
    assert "is an ensemble; fine-tune from one of its members" in capsys.readouterr().err


def test_the_ensemble_and_its_top_label_map_export_to_onnx(members: dict[str, Path], cifar_subset: Path,
                                                           tmp_path: Path) -> None:
    assert _ensemble([members["a"], members["b"]], cifar_subset, tmp_path / "joined") == 0
    manifest_path = tmp_path / "joined" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["calibration"]["top_label"] = BETA_MAP  # whatever the fit kept: test the map
    manifest_path.write_text(json.dumps(manifest))
    assert main(["export", str(tmp_path / "joined"), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    described = json.loads((tmp_path / "onnx" / "model.json").read_text())
    assert described["calibration"]["top_label"] == BETA_MAP
    assert described["check"]["max_abs_diff"] <= 1e-4


def test_members_initialised_differently_are_still_one_network(members: dict[str, Path]) -> None:
    from training.image.ensemble import check_members

    first, second = read_manifest(members["a"]), read_manifest(members["b"])
    assert first.config["identity_init"] is True  # the default recipe's
    older = dataclasses.replace(second, config={k: v for k, v in second.config.items() if k != "identity_init"})
    assert check_members([first, older]) == check_members([first, second])
    wider = dataclasses.replace(second, config={**second.config, "widths": [16, 32, 64]})
    with pytest.raises(ValueError, match="architecture config"):
        check_members([first, wider])
