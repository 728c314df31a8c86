"""The shared trainer shape: stages run in order, one recipe merge rule, one refit note, one options mapping."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from training.engine.options import RunOptions, add_loop_arguments, run_options_from_args
from training.engine.recipe import Recipe, merge_recipes
from training.engine.refit import HeldOut, refit_record
from training.engine.trainer import Stopped, run_trainer


class _Recorder:
    task = "test"

    def __init__(self, stop: bool = False) -> None:
        self.calls: list[str] = []
        self.stop = stop

    def prepare(self, options: str) -> str:
        self.calls.append(f"prepare {options}")
        return "prepared"

    def build(self, options: str, prepared: str) -> str:
        self.calls.append(f"build {prepared}")
        return "built"

    def fit(self, options: str, prepared: str, built: str) -> str | Stopped:
        self.calls.append(f"fit {built}")
        return Stopped(Path("state")) if self.stop else "fitted"

    def export(self, options: str, prepared: str, fitted: str) -> dict[str, Any]:
        self.calls.append(f"export {fitted}")
        return {"checkpoint": "out"}


def test_run_trainer_runs_prepare_build_fit_export_in_order() -> None:
    trainer = _Recorder()
    assert run_trainer(trainer, "options") == {"checkpoint": "out"}
    assert trainer.calls == ["prepare options", "build prepared", "fit built", "export fitted"]


def test_a_stopped_fit_skips_export_and_names_the_resumable_state() -> None:
    trainer = _Recorder(stop=True)
    assert run_trainer(trainer, "options") == {"stopped": True, "state": "state"}
    assert trainer.calls[-1] == "fit built"


def test_recipes_merge_key_by_key_with_the_later_layer_winning() -> None:
    recipe = Recipe(loop={"epochs": 10, "lr": 0.1}, batch_size=512, model={"width": 8}, extra={"flip": "random"})
    parent = Recipe(model={"width": 16, "depth": 2})
    command_line = Recipe(loop={"lr": 0.05}, model={"depth": 3})
    merged = merge_recipes(recipe, parent, command_line)
    assert merged.loop == {"epochs": 10, "lr": 0.05} and merged.batch_size == 512
    assert merged.model == {"width": 16, "depth": 3} and merged.extra == {"flip": "random"}
    assert merge_recipes(recipe, Recipe(batch_size=32)).batch_size == 32
    config = merged.loop_config(seed=7, precision="fp32")
    assert (config.epochs, config.lr, config.seed, config.precision) == (10, 0.05, 7, "fp32")


def test_a_recipe_refuses_a_loop_setting_the_loop_does_not_have() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        Recipe(loop={"learning_rate": 0.1})


def test_every_refit_note_has_one_wording() -> None:
    split = refit_record(HeldOut.split(120, 480, "pairs"), 600, "pairs")
    folds = refit_record(HeldOut.folds(5, "posts"), 250, "posts", refit_posts=250)
    assert split["refit_full"] is True and folds["refit_full"] is True and folds["refit_posts"] == 250
    assert split["note"].startswith("validation metrics and calibration measured on the 120 validation pairs")
    assert "before the refit on all 600 pairs" in split["note"]
    assert folds["note"].startswith("validation metrics and calibration measured on 5-fold out-of-fold predictions")
    assert "before the refit on all 250 posts" in folds["note"]


def test_one_mapping_fills_the_common_options_from_any_command_line() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--name")
    add_loop_arguments(parser)
    args = parser.parse_args(["--data", "d", "--output", "o", "--epochs", "3", "--lr", "0.5", "--seed", "2"])
    options = RunOptions(**run_options_from_args(args))
    assert options.loop == {"epochs": 3, "lr": 0.5} and options.seed == 2 and options.batch_size is None
    assert (options.refit_full, options.calibration_folds, options.stop_after_steps) == (False, "auto", None)
