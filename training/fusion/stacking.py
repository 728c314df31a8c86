"""Fitting the per-modality linear scorers of late fusion, and their out-of-fold scores.

Each side's scorer (the text bag's linear layer, the image features' linear layer) is a balanced
multinomial logistic regression (scikit-learn) on that side's features. The fusion head must not
learn from scores a scorer produced for examples it was fitted on (those look far more certain
than scores on new data), so every training example gets *out-of-fold* scores: from a scorer
fitted on the other ``folds`` − 1 folds (stratified, seeded).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclasses.dataclass
class ScorerOptions:
    C: float = 1.0  # inverse L2 strength
    folds: int = 5


def _logistic(C: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=3000, class_weight="balanced", random_state=seed)


def _active_columns(matrix: Any) -> np.ndarray:
    """Columns with any non-zero entry: the others get weight 0 under L2 anyway, so L-BFGS can skip them."""
    if hasattr(matrix, "getnnz"):
        return np.flatnonzero(matrix.getnnz(axis=0) > 0)
    return np.arange(matrix.shape[1])


def fit_scorer(matrix: Any, labels: torch.Tensor, classes: int, options: ScorerOptions,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (classes, features), bias (classes,)) of the fit on ``matrix`` (rows × features)."""
    y = labels.numpy()
    present = np.unique(y)
    if len(present) != classes:
        raise ValueError(f"the training rows cover {len(present)} of {classes} classes; every class needs examples")
    active = _active_columns(matrix)
    classifier = _logistic(options.C, seed).fit(matrix[:, active], y)
    weight = np.zeros((classes, matrix.shape[1]), dtype=np.float32)
    weight[:, active] = classifier.coef_
    return torch.from_numpy(weight), torch.from_numpy(np.asarray(classifier.intercept_, dtype=np.float32))


def out_of_fold_scores(matrix: Any, labels: torch.Tensor, classes: int, options: ScorerOptions,
                       seed: int = 0) -> torch.Tensor:
    """(N, classes) scores of every row from a fit on the other folds."""
    from sklearn.model_selection import StratifiedKFold

    y = labels.numpy()
    scores = np.zeros((len(y), classes), dtype=np.float32)
    folds = StratifiedKFold(n_splits=options.folds, shuffle=True, random_state=seed)
    for train_rows, held_rows in folds.split(np.zeros(len(y)), y):
        active = _active_columns(matrix[train_rows])
        classifier = _logistic(options.C, seed).fit(matrix[train_rows][:, active], y[train_rows])
        scores[held_rows] = classifier.decision_function(matrix[held_rows][:, active])
    return torch.from_numpy(scores)


def load_linear(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor, transpose: bool = False) -> None:
    """Copy a fitted (classes, features) weight into ``layer`` (``transpose`` for the bag's (features, classes))."""
    with torch.no_grad():
        layer.weight.copy_(weight.T if transpose else weight)  # type: ignore[operator]
        layer.bias.copy_(bias)  # type: ignore[operator]
