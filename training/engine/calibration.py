"""Fitting the calibration map (``models.calibration``) and calibration metrics (ECE, equal-width bins)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from models.calibration import Calibration, TopLabelMap, top_label_parts
from models.text_models import signed_power

MIN_ERRORS = 30  # wrong predictions a top-label map needs to be fitted on
KEEP_MAP_BELOW = 0.9  # the map's out-of-fold ECE, as a share of the temperature's, for it to be kept
SCORE_POWERS = tuple(round(1.0 + 0.1 * step, 1) for step in range(16))  # 1.0 … 2.5


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the |accuracy − confidence| gap over ``bins`` equal-width bins, weighted by bin size."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    error = torch.zeros(())
    for lower, upper in itertools.pairwise(edges):
        members = (confidence > lower) & (confidence <= upper)
        if members.any():
            gap = (correct[members].mean() - confidence[members].mean()).abs()
            error += gap * members.float().mean()
    return float(error)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on held-out data."""
    logits, labels = logits.detach().float().clone(), labels.detach().clone()
    log_temperature = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp().clamp(0.05, 20.0))


def fit_top_label_map(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> TopLabelMap | None:
    """The beta map of the tempered top probability c (``models.calibration.TopLabelMap``), fitted by the
    log-loss of "the top class is right" on held-out data; None when the data cannot support three
    more parameters (fewer than ``MIN_ERRORS`` wrong predictions, or a fit that is not finite)."""
    log_odds = top_label_parts(logits.detach().double() / temperature).log_odds.squeeze(-1)
    correct = (logits.argmax(dim=1) == labels).double()
    if int((correct == 0).sum()) < MIN_ERRORS:
        return None
    log_top, log_rest = -F.softplus(-log_odds), -F.softplus(log_odds)  # log c, log(1 − c), never rounded to 0
    parameters = torch.tensor([1.0, 1.0, 0.0], dtype=torch.double, requires_grad=True)  # the identity map
    optimizer = torch.optim.LBFGS([parameters], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        mapped = parameters[0] * log_top - parameters[1] * log_rest + parameters[2]
        loss = F.binary_cross_entropy_with_logits(mapped, correct)
        loss.backward()
        return loss

    optimizer.step(closure)
    top_weight, rest_weight, intercept = (float(value) for value in parameters.detach())
    if not all(math.isfinite(value) for value in (top_weight, rest_weight, intercept)):
        return None
    return TopLabelMap(min(max(top_weight, 0.05), 20.0), min(max(rest_weight, 0.05), 20.0),
                       min(max(intercept, -10.0), 10.0))


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, top_label: bool = False) -> Calibration:
    temperature = fit_temperature(logits, labels)
    return Calibration(temperature, fit_top_label_map(logits, labels, temperature) if top_label else None)


# (held-out logits, labels) → a map from logits to calibrated probabilities
Fitter = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def calibration_fitter(top_label: bool) -> Fitter:
    """``fit_calibration`` as a ``Fitter``: the map this project ships, with or without a top-label map."""
    return lambda logits, labels: fit_calibration(logits, labels, top_label).probabilities


def out_of_fold_ece(logits: torch.Tensor, labels: torch.Tensor, fit: Fitter, repeats: int = 5) -> float:
    """ECE of the map ``fit`` gives on one half of the examples, applied to the other, both ways round,
    averaged over ``repeats`` random halvings: what the map does on data it was not fitted on."""
    errors = []
    for repeat in range(repeats):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(repeat))
        halves = (order[: len(order) // 2], order[len(order) // 2:])
        probabilities = torch.empty(logits.shape, dtype=torch.float32)
        for fit_on, apply_to in (halves, halves[::-1]):
            probabilities[apply_to] = fit(logits[fit_on], labels[fit_on])(logits[apply_to]).float()
        errors.append(expected_calibration_error(probabilities, labels))
    return sum(errors) / len(errors)


def calibrate(logits: torch.Tensor, labels: torch.Tensor, top_label: bool = False) -> dict[str, Any]:
    """Fit the calibration map on (logits, labels); report ECE and NLL before and after.

    With ``top_label`` a top-label map is fitted after the temperature, and kept only if it lowers the
    out-of-fold ECE by a tenth or more (both figures are recorded): two parameters more must earn their
    place on data they were not fitted on, by more than the noise of halving the split.
    """
    calibration = fit_calibration(logits, labels, top_label=False)
    report: dict[str, Any] = {}
    if top_label:
        with_map = fit_calibration(logits, labels, top_label=True)
        report["ece_out_of_fold"] = {"temperature": out_of_fold_ece(logits, labels, calibration_fitter(False)),
                                     "top_label": out_of_fold_ece(logits, labels, calibration_fitter(True))}
        if with_map.top_label is not None and \
                report["ece_out_of_fold"]["top_label"] < KEEP_MAP_BELOW * report["ece_out_of_fold"]["temperature"]:
            calibration = with_map
    after = calibration.probabilities(logits)
    result: dict[str, Any] = {
        "temperature": calibration.temperature,
        "ece_before": expected_calibration_error(logits.float().softmax(dim=1), labels),
        "ece_after": expected_calibration_error(after, labels),
        "nll_before": float(F.cross_entropy(logits.float(), labels)),
        "nll_after": float(F.nll_loss(calibration.log_probabilities(logits), labels)),
    }
    if calibration.top_label is not None:
        result["top_label"] = calibration.top_label.to_dict()
    return result | report


def fit_score_power(logits: torch.Tensor, labels: torch.Tensor, powers: tuple[float, ...] = SCORE_POWERS) -> float:
    """The exponent p (from ``powers``) whose sign(s)·|s|^p, temperature-scaled, has the lowest NLL.

    Two parameters (p and then T) fitted on held-out predictions: for a linear SVM's scores this
    fixes what a temperature alone cannot (over-confidence at the top, under-confidence below).
    """
    def nll(power: float) -> float:
        transformed = signed_power(logits.float(), power)
        return float(F.cross_entropy(transformed / fit_temperature(transformed, labels), labels))

    return min(powers, key=nll)
