"""A linear classifier fitted on frozen features: the small-data fine-tune.

With a backbone kept frozen, the classifier is a multinomial logistic regression on the features
the backbone gives each example (a convex fit: deterministic, seconds, no epochs to choose). Its L2
strength is picked from a small grid by the out-of-fold NLL, and those out-of-fold logits are what
the temperature is fitted on and the validation metrics are measured on: every example is used both
to train the shipped head and, held out by a fold, to calibrate it.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from training.engine.adaptive import out_of_fold_logits

logger = logging.getLogger(__name__)

L2_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


@dataclasses.dataclass
class HeadFit:
    weight: torch.Tensor  # (classes, features): logits = features @ weight.T
    l2: float
    out_of_fold_logits: torch.Tensor  # (N, classes), each from the fit that did not see that example
    folds: int


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
                 class_weights: list[float] | None = None) -> torch.Tensor:
    """Weights (classes, features) minimising the (class-weighted) cross-entropy + l2 · ‖W‖²."""
    features = features.double()
    weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float64)
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T, labels, weight=weights) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float()


def cross_fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int, seed: int,
                   class_weights: list[float] | None = None, l2_grid: tuple[float, ...] = L2_GRID) -> HeadFit:
    """Pick L2 by K-fold out-of-fold NLL, then fit the head on every example with it."""
    scale = features.norm(dim=1).mean().clamp(min=1e-6)
    features = features / scale  # the grid is meant for features of unit norm on average
    best: tuple[float, float, torch.Tensor] | None = None
    for l2 in l2_grid:
        def score(_: int, train: torch.Tensor, held: torch.Tensor, l2: float = l2) -> torch.Tensor:
            return features[held] @ fit_logistic(features[train], labels[train], num_classes, l2, class_weights).T

        logits = out_of_fold_logits(labels, num_classes, folds, seed, score)
        nll = float(F.cross_entropy(logits, labels))
        logger.info("head fit: l2 %.0e → out-of-fold NLL %.4f, accuracy %.4f", l2, nll,
                    float((logits.argmax(dim=1) == labels).float().mean()))
        if best is None or nll < best[0]:
            best = (nll, l2, logits)
    assert best is not None
    _, l2, logits = best
    weight = fit_logistic(features, labels, num_classes, l2, class_weights) / scale
    return HeadFit(weight=weight, l2=l2, out_of_fold_logits=logits, folds=folds)
