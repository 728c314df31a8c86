"""The calibration map a checkpoint's manifest carries: logits → the distribution the service answers.

Every model divides its logits by a fitted temperature before the softmax. A model may also carry a
*top-label map*, beta calibration of its top class's probability (Kull et al., 2017): c becomes
sigmoid(a · log c − b · log(1 − c) + m), and the other classes share 1 − c' in their old proportions
(a = b is Platt scaling of logit(c)). One temperature is set by the bulk of confident
predictions; a long-trained CNN is then still over-confident in the middle (0.5–0.9), which the two
extra parameters fix without touching the ranking (the top class stays on top: see ``_remap_top_label``).
It is computed in log space from the logits, so a saturated row still sums to 1.

Training fits the map (``training.engine.calibration``); the service, the exported graphs and the
metrics all apply it through ``Calibration.probabilities``, so one formula serves all of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError

# In log-odds: the top class stays strictly above the runner-up, so a tie cannot hand it the label.
_RANK_MARGIN = 1e-4


@dataclasses.dataclass(frozen=True)
class TopLabelMap:
    """logit(c') = log_top_weight · log c − log_rest_weight · log(1 − c) + intercept for the tempered
    top probability c; both weights positive, so c' rises with c."""

    log_top_weight: float
    log_rest_weight: float
    intercept: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def log_odds(self, log_odds: torch.Tensor) -> torch.Tensor:
        """logit(c) → logit(c'), through log c = −softplus(−logit c) and log(1 − c) = −softplus(logit c)."""
        return (self.log_rest_weight * F.softplus(log_odds) - self.log_top_weight * F.softplus(-log_odds)
                + self.intercept)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A checkpoint's calibration map: a temperature, then the top-label map if it has one."""

    temperature: float = 1.0
    top_label: TopLabelMap | None = None

    @classmethod
    def from_manifest(cls, calibration: Any) -> Calibration:
        """The map a manifest's ``calibration`` describes; a checkpoint with nonsense in it is refused."""
        if not isinstance(calibration, Mapping):
            raise CheckpointError("calibration must be an object with a temperature")
        temperature = _positive_number(calibration.get("temperature", 1.0), "calibration.temperature")
        top_label = calibration.get("top_label")
        if top_label is None:
            return cls(temperature)
        if not isinstance(top_label, Mapping):
            raise CheckpointError("calibration.top_label must be an object with log_top_weight, log_rest_weight "
                                  "and intercept")
        return cls(temperature, TopLabelMap(
            _positive_number(top_label.get("log_top_weight"), "calibration.top_label.log_top_weight"),
            _positive_number(top_label.get("log_rest_weight"), "calibration.top_label.log_rest_weight"),
            _finite_number(top_label.get("intercept"), "calibration.top_label.intercept")))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits → (B, classes) calibrated probabilities, in float32."""
        scaled = logits.float() / self.temperature
        if self.top_label is None or scaled.shape[-1] < 2:
            return torch.softmax(scaled, dim=-1)
        return _remap_top_label(scaled, self.top_label)

    def log_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """log of ``probabilities``, exact (log-softmax) when there is no top-label map (NLL, scoring)."""
        if self.top_label is None:
            return torch.log_softmax(logits.float() / self.temperature, dim=-1)
        return self.probabilities(logits).clamp_min(1e-12).log()


@dataclasses.dataclass(frozen=True)
class TopLabelParts:
    """A row's top class split from the rest, in log space: no probability is rounded to 0 or 1 first."""

    is_top: torch.Tensor  # (B, classes) bool: the predicted class
    others: torch.Tensor  # (B, classes) the scaled logits with the top one at −inf
    log_odds: torch.Tensor  # (B, 1) logit(c) = z_top − logsumexp(z_others)
    runner_up_log_odds: torch.Tensor  # (B, 1) the runner-up's share of the others, as a log-odds bound


def top_label_parts(scaled: torch.Tensor) -> TopLabelParts:
    """``scaled`` (B, classes): logits divided by the temperature."""
    is_top = F.one_hot(scaled.argmax(dim=-1), scaled.shape[-1]).bool()
    top = scaled.masked_fill(~is_top, float("-inf")).amax(dim=-1, keepdim=True)
    others = scaled.masked_fill(is_top, float("-inf"))
    rest = torch.logsumexp(others, dim=-1, keepdim=True)
    return TopLabelParts(is_top, others, top - rest, others.amax(dim=-1, keepdim=True) - rest)


def _remap_top_label(scaled: torch.Tensor, mapping: TopLabelMap) -> torch.Tensor:
    """The top class gets sigmoid(ℓ'), the others share sigmoid(−ℓ') in their old proportions.

    ℓ' is the map's log-odds, kept a hair above those at which the runner-up would draw level (its
    share q of the others must stay below c'/(1 − c')): the map changes confidences, never the
    predicted class.
    """
    parts = top_label_parts(scaled)
    mapped = mapping.log_odds(parts.log_odds)
    log_odds = torch.maximum(mapped, parts.runner_up_log_odds + _RANK_MARGIN)
    shares = torch.softmax(parts.others, dim=-1)  # 0 at the top class
    return torch.where(parts.is_top, torch.sigmoid(log_odds).expand_as(scaled), shares * torch.sigmoid(-log_odds))


def _finite_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _positive_number(value: Any, where: str) -> float:
    number = _finite_number(value, where)
    if number <= 0:
        raise CheckpointError(f"{where} must be positive, got {value!r}")
    return number
