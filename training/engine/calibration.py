"""Temperature scaling and calibration metrics (ECE with equal-width confidence bins)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from models.text_models import signed_power

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


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Fit T on (logits, labels); report ECE and NLL before and after."""
    temperature = fit_temperature(logits, labels)
    before = logits.float().softmax(dim=1)
    after = (logits.float() / temperature).softmax(dim=1)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "nll_before": float(F.cross_entropy(logits.float(), labels)),
        "nll_after": float(F.cross_entropy(logits.float() / temperature, labels)),
    }


def fit_score_power(logits: torch.Tensor, labels: torch.Tensor, powers: tuple[float, ...] = SCORE_POWERS) -> float:
    """The exponent p (from ``powers``) whose sign(s)·|s|^p, temperature-scaled, has the lowest NLL.

    Two parameters (p and then T) fitted on held-out predictions: for a linear SVM's scores this
    fixes what a temperature alone cannot (over-confidence at the top, under-confidence below).
    """
    def nll(power: float) -> float:
        transformed = signed_power(logits.float(), power)
        return float(F.cross_entropy(transformed / fit_temperature(transformed, labels), labels))

    return min(powers, key=nll)
