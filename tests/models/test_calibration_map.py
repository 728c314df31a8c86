"""The calibration map every consumer applies (models.calibration): a distribution, the same ranking,
refusal of nonsense in a manifest, and a fit that repairs a mid-range over-confident model."""

from __future__ import annotations

import math

import pytest
import torch

from models.calibration import Calibration, TopLabelMap
from models.checkpoint import CheckpointError
from training.engine.calibration import (
    calibrate,
    calibration_fitter,
    expected_calibration_error,
    fit_calibration,
    out_of_fold_ece,
)

MAP = Calibration(0.7, TopLabelMap(log_top_weight=0.8, log_rest_weight=1.3, intercept=-0.4))


def _hard_logits() -> torch.Tensor:
    logits = torch.randn(500, 10, generator=torch.Generator().manual_seed(0)) * 4
    logits[0] = torch.tensor([300.0] + [0.0] * 9)  # saturated: the top probability is exactly 1 in float32
    logits[1] = torch.tensor([2.0, 2.0] + [0.0] * 8)  # a tie for the top
    logits[2] = torch.zeros(10)  # uniform
    logits[3] = torch.tensor([1.0, 0.99] + [-50.0] * 8)  # runner-up right behind: the map must not swap them
    return logits


def test_without_a_map_it_is_the_tempered_softmax() -> None:
    logits = _hard_logits()
    assert torch.allclose(Calibration(0.7).probabilities(logits), torch.softmax(logits / 0.7, dim=-1))
    assert torch.allclose(Calibration(0.7).log_probabilities(logits), torch.log_softmax(logits / 0.7, dim=-1))


def test_the_top_label_map_keeps_a_distribution_and_the_ranking() -> None:
    logits = _hard_logits()
    tempered = torch.softmax(logits / 0.7, dim=-1)
    mapped = MAP.probabilities(logits)
    assert torch.isfinite(mapped).all() and (mapped >= 0).all()
    assert torch.allclose(mapped.sum(dim=-1), torch.ones(len(logits)), atol=1e-6)
    assert torch.equal(mapped.argmax(dim=-1), tempered.argmax(dim=-1))
    top, runner_up = tempered[10:].topk(2, dim=-1).values.double().unbind(-1)
    # these rows are far from saturation: the direct formula is exact enough
    beta = 0.8 * torch.log(top) - 1.3 * torch.log(1 - top) - 0.4
    bound = torch.log(runner_up / (1 - top))  # where the runner-up, rescaled, would draw level
    expected = torch.sigmoid(torch.maximum(beta, bound + 1e-4))
    assert torch.allclose(mapped[10:].max(dim=-1).values.double(), expected, atol=1e-5)
    others = torch.softmax(logits[10:] / 0.7, dim=-1).masked_fill(torch.nn.functional.one_hot(
        tempered[10:].argmax(-1), 10).bool(), 0)  # the others keep their proportions
    mapped_others = mapped[10:].masked_fill(others == 0, 0)
    assert torch.allclose(mapped_others / mapped_others.sum(-1, keepdim=True), others / others.sum(-1, keepdim=True),
                          atol=1e-5)


def test_saturated_rows_still_sum_to_one_and_rank_by_their_logits() -> None:
    """Far past where float32 rounds the tempered top probability to 1, the map still sees the logits."""
    gaps = torch.tensor([5.0, 16.5, 30.0, 200.0])
    logits = torch.zeros(len(gaps), 3)
    logits[:, 0] = gaps
    mapped = Calibration(1.0, TopLabelMap(log_top_weight=0.5, log_rest_weight=0.5, intercept=-1.0)).probabilities(logits)
    assert torch.allclose(mapped.sum(dim=-1), torch.ones(len(gaps)), atol=1e-6)
    expected_top = torch.sigmoid(0.5 * (gaps - math.log(2)) - 1.0)  # equal weights: Platt, logit(c) = gap − log 2
    assert torch.allclose(mapped[:, 0], expected_top, atol=1e-6)
    assert (mapped[:, 1] == mapped[:, 2]).all() and (mapped[:, 1].diff() < 0).all()


@pytest.mark.parametrize(("calibration", "message"), [
    ([1.0], "calibration must be an object with a temperature"),
    ({"temperature": -1.0}, "calibration.temperature must be positive"),
    ({"temperature": float("nan")}, "calibration.temperature must be a finite number"),
    ({"temperature": "1.0"}, "calibration.temperature must be a finite number"),
    ({"temperature": True}, "calibration.temperature must be a finite number"),
    ({"temperature": 1.0, "top_label": [1, 0]}, "calibration.top_label must be an object"),
    ({"temperature": 1.0, "top_label": {"log_top_weight": 0.0, "log_rest_weight": 1.0, "intercept": 0.0}},
     "top_label.log_top_weight must be positive"),
    ({"temperature": 1.0, "top_label": {"log_top_weight": 1.0, "intercept": 0.0}},
     "top_label.log_rest_weight must be a finite number"),
    ({"temperature": 1.0, "top_label": {"log_top_weight": 1.0, "log_rest_weight": 1.0}},
     "top_label.intercept must be a finite number"),
    ({"temperature": 1.0, "top_label": {"log_top_weight": 1.0, "log_rest_weight": 1.0, "intercept": math.inf}},
     "top_label.intercept must be a finite"),
])
def test_nonsense_in_a_manifest_is_refused(calibration: object, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        Calibration.from_manifest(calibration)


def _overconfident_in_the_middle(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose top class is right with probability sigmoid(logit(c) − 1) for a stated confidence c:
    right as often as claimed near 1, much less often in the middle, the shape of a long-trained CNN
    that one temperature cannot fix."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, 10, generator=generator) * 2.5
    stated, predicted = logits.softmax(dim=-1).max(dim=-1)
    right = torch.rand(count, generator=generator) < torch.sigmoid(torch.logit(stated.clamp(1e-6, 1 - 1e-6)) - 1)
    wrong = (predicted + 1 + torch.randint(0, 9, (count,), generator=generator)) % 10
    return logits, torch.where(right, predicted, wrong)


def test_calibrate_keeps_the_map_only_where_it_helps_out_of_fold() -> None:
    logits, labels = _overconfident_in_the_middle(3000, seed=0)
    result = calibrate(logits, labels, top_label=True)
    out_of_fold = result["ece_out_of_fold"]
    assert out_of_fold["top_label"] < out_of_fold["temperature"] * 0.7
    assert "top_label" in result and result["ece_after"] < 0.04
    fresh_logits, fresh_labels = _overconfident_in_the_middle(3000, seed=1)  # and on data it was not fitted on
    fitted = Calibration.from_manifest(result)
    assert expected_calibration_error(fitted.probabilities(fresh_logits), fresh_labels) < \
        expected_calibration_error(Calibration(result["temperature"]).probabilities(fresh_logits), fresh_labels)
    assert "top_label" not in calibrate(logits, labels)  # only when asked


def test_a_map_that_does_not_help_is_not_kept() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3000, 10, generator=generator) * 3
    labels = torch.distributions.Categorical(logits=logits).sample()  # calibrated by construction
    result = calibrate(logits, labels, top_label=True)
    if "top_label" not in result:
        assert result["ece_out_of_fold"]["top_label"] >= 0.9 * result["ece_out_of_fold"]["temperature"]
    assert abs(result["temperature"] - 1.0) < 0.1
    assert out_of_fold_ece(logits, labels, calibration_fitter(False), repeats=2) < 0.03
    assert fit_calibration(logits, labels).top_label is None


def test_no_map_is_fitted_on_too_few_errors() -> None:
    logits = torch.randn(400, 10, generator=torch.Generator().manual_seed(4)) * 3
    labels = logits.argmax(dim=1)
    labels[:10] = (labels[:10] + 1) % 10  # 10 wrong predictions: too few to fit two more parameters on
    assert fit_calibration(logits, labels, top_label=True).top_label is None
    assert "top_label" not in calibrate(logits, labels, top_label=True)
