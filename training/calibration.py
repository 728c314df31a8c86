"""Temperature scaling and calibration metrics (ECE with equal-width confidence bins)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


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
