"""The transfer study runs end to end on a tiny budget and writes an honest table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.cli import main


def test_transfer_study_quick_writes_table_plot_and_every_arm(image_trunk_checkpoint: Path, news_subset: Path,
                                                             tmp_path: Path) -> None:
    results = tmp_path / "study"
    assert main(["transfer-study", "--from", str(image_trunk_checkpoint), "--data", str(news_subset),
                 "--output", str(results), "--quick", "--device", "cpu"]) == 0
    table = (results / "results.md").read_text()
    for arm in ("scratch", "random-frozen", "image-frozen", "image-finetuned", "tfidf-svm"):
        assert f"`{arm}`" in table
    assert "50% labels" in table and "100% labels" in table and " ± " in table
    assert (results / "transfer.png").stat().st_size > 1000
    runs = json.loads((results / "runs.json").read_text())
    assert len(runs) == 10 and all(0.0 <= r["accuracy"] <= 1.0 for r in runs)
    # a second call resumes: nothing is trained again
    assert main(["transfer-study", "--from", str(image_trunk_checkpoint), "--data", str(news_subset),
                 "--output", str(results), "--quick", "--device", "cpu"]) == 0
    assert json.loads((results / "runs.json").read_text()) == runs
    # an interrupted study still reports what it has: drop some runs, report without training anything
    kept = [r for r in runs if not (r["fraction"] == 1.0 and r["arm"] in ("scratch", "tfidf-svm"))]
    (results / "runs.json").write_text(json.dumps(kept))
    assert main(["transfer-study", "--from", str(image_trunk_checkpoint), "--data", str(news_subset),
                 "--output", str(results), "--quick", "--report-only"]) == 0
    assert json.loads((results / "runs.json").read_text()) == kept
    rows = {line.split(" | ")[0].strip("| `"): line for line in (results / "results.md").read_text().splitlines()}
    assert rows["scratch"].endswith("| not run |") and rows["tfidf-svm"].endswith("| not run |")
    assert "not run" not in rows["image-frozen"]


def _other_trunk(checkpoint: Path, folder: Path) -> Path:
    """The same tiny trunk with other weights: a second source whose runs must not be mixed up with the first's."""
    from models.checkpoint import load_state_dict, save_checkpoint
    from models.registry import build_model

    state, manifest = load_state_dict(checkpoint)
    model = build_model(manifest.architecture, manifest.config)
    model.load_state_dict({name: tensor + 0.05 for name, tensor in state.items()})
    return save_checkpoint(folder / "other-trunk", model, manifest)


def test_transfer_study_compares_two_sources_on_chosen_arms_and_grids(image_trunk_checkpoint: Path, news_subset: Path,
                                                                      tmp_path: Path) -> None:
    from models.checkpoint import read_manifest

    other = _other_trunk(image_trunk_checkpoint, tmp_path)
    results = tmp_path / "study"
    common = ["--data", str(news_subset), "--output", str(results), "--quick", "--device", "cpu", "--fractions", "1.0",
              "--arms", "image-frozen", "previous-image-frozen", "--grid", "image-frozen=0.05,0.2"]
    assert main(["transfer-study", "--from", str(image_trunk_checkpoint), "--compare-from", str(other), *common]) == 0
    runs = json.loads((results / "runs.json").read_text())
    assert sorted((r["arm"], r["value"]) for r in runs) == [
        ("image-frozen", 0.05), ("image-frozen", 0.2), ("previous-image-frozen", 0.03)]
    sources = {r["arm"]: r["source"] for r in runs}  # each arm trained from its own checkpoint
    assert sources == {"image-frozen": read_manifest(image_trunk_checkpoint).weights_sha256,
                       "previous-image-frozen": read_manifest(other).weights_sha256}
    table = (results / "results.md").read_text()
    assert "`previous-image-frozen`" in table and "`scratch`" not in table
    summary = json.loads((results / "summary.json").read_text())
    assert summary["settings"]["compare_checkpoint"] == str(other)
    assert summary["settings"]["grids"] == {"image-frozen": [0.05, 0.2], "previous-image-frozen": [0.03]}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in runs)
    # the same folder with the sources swapped: nothing is reused across sources, every run is trained again
    assert main(["transfer-study", "--from", str(other), "--compare-from", str(image_trunk_checkpoint), *common]) == 0
    assert len(json.loads((results / "runs.json").read_text())) == 2 * len(runs)


def test_transfer_study_refuses_unknown_arms_bad_grids_and_a_comparison_without_its_source(
        image_trunk_checkpoint: Path, news_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["transfer-study", "--from", str(image_trunk_checkpoint), "--data", str(news_subset),
            "--output", str(tmp_path / "study"), "--quick"]
    assert main([*base, "--arms", "image-frozen", "mystery"]) == 2
    assert "unknown arm(s) mystery" in capsys.readouterr().err
    assert main([*base, "--arms", "previous-image-frozen"]) == 2
    assert "needs --compare-from" in capsys.readouterr().err
    assert main([*base, "--arms", "image-frozen", "--compare-from", str(image_trunk_checkpoint)]) == 2
    assert "--arms leaves out" in capsys.readouterr().err
    assert main([*base, "--arms", "image-frozen", "--grid", "scratch=0.1"]) == 2
    assert "--grid for scratch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--grid", "image-frozen=0.1,-1"])
    assert "positive values" in capsys.readouterr().err
    assert not (tmp_path / "study" / "runs.json").exists()
