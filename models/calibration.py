"""The calibration map a checkpoint's manifest carries: logits → the distribution the service answers.

Every model divides its logits by a fitted temperature before the softmax. A model may also carry a
*top-label map*: its top class's probability c becomes sigmoid(slope · logit(c) + intercept), and the
other classes share 1 − c' in their old proportions. One temperature is set by the bulk of confident
predictions; a long-trained CNN is then still over-confident in the middle (0.5–0.9), which the two
extra parameters fix without touching the ranking (the top class stays on top: see ``_top_probability``).

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

# Keeps logit(c) finite for c of exactly 0 or 1 (float32 softmax saturates).
_EDGE = 1e-7
_RANK_MARGIN = 1e-6


@dataclasses.dataclass(frozen=True)
class TopLabelMap:
    slope: float
    intercept: float

    def to_dict(self) -> dict[str, float]:
        return {"slope": self.slope, "intercept": self.intercept}


@dataclasses.dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    top_label: TopLabelMap | None = None

    @classmethod
    def from_manifest(cls, calibration: Mapping[str, Any]) -> Calibration:
        """The map a manifest's ``calibration`` describes; a checkpoint with nonsense in it is refused."""
        temperature = _positive_number(calibration.get("temperature", 1.0), "calibration.temperature")
        top_label = calibration.get("top_label")
        if top_label is None:
            return cls(temperature)
        if not isinstance(top_label, Mapping):
            raise CheckpointError("calibration.top_label must be an object with slope and intercept")
        slope = _positive_number(top_label.get("slope"), "calibration.top_label.slope")
        intercept = _finite_number(top_label.get("intercept"), "calibration.top_label.intercept")
        return cls(temperature, TopLabelMap(slope, intercept))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits → (B, classes) calibrated probabilities, in float32."""
        probabilities = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_label is None or probabilities.shape[-1] < 2:
            return probabilities
        return _remap_top_label(probabilities, self.top_label)

    def log_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """log of ``probabilities``, exact (log-softmax) when there is no top-label map (NLL, scoring)."""
        if self.top_label is None:
            return torch.log_softmax(logits.float() / self.temperature, dim=-1)
        return self.probabilities(logits).clamp_min(1e-12).log()


def _remap_top_label(probabilities: torch.Tensor, mapping: TopLabelMap) -> torch.Tensor:
    top2 = probabilities.topk(2, dim=-1).values
    top, second = top2[..., :1], top2[..., 1:]
    new_top = _top_probability(top, second, mapping)
    is_top = F.one_hot(probabilities.argmax(dim=-1), probabilities.shape[-1]).bool()
    # The others keep their proportions; (1 − top) is at least _EDGE so a saturated row stays finite.
    rest = probabilities * (1 - new_top) / (1 - top).clamp_min(_EDGE)
    return torch.where(is_top, new_top.expand_as(probabilities), rest)


def _top_probability(top: torch.Tensor, second: torch.Tensor, mapping: TopLabelMap) -> torch.Tensor:
    """sigmoid(slope · logit(top) + intercept), never below the rescaled runner-up.

    With the others scaled by (1 − c') / (1 − c), the top class stays on top iff
    c' ≥ second / (1 − c + second): the map changes confidences, never the predicted class (a hair
    above that bound, so that a tie cannot hand the label to the runner-up).
    """
    mapped = torch.sigmoid(mapping.slope * torch.logit(top.clamp(_EDGE, 1 - _EDGE)) + mapping.intercept)
    keeps_rank = second / (1 - top + second).clamp_min(_EDGE) + _RANK_MARGIN
    return torch.minimum(torch.maximum(mapped, keeps_rank), torch.ones_like(top))


def _finite_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _positive_number(value: Any, where: str) -> float:
    number = _finite_number(value, where)
    if number <= 0:
        raise CheckpointError(f"{where} must be positive, got {value!r}")
    return number
