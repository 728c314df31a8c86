"""``image_ensemble``: K image classifiers of one architecture, trained apart, served as one model.

Its logits are the mean of its members' logits. After the softmax that is the normalised geometric
mean of the members' distributions (a row's log-sum-exp is a constant the softmax drops), calibrated
as one model on the validation split the members share (``python -m training ensemble-image``).
Members differ in their initialisation and data order; averaging them removes part of each one's
errors, and their test-time views can be fewer than a single model needs for the same accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from models.registry import build_model, register_model

MAX_MEMBERS = 8  # a manifest asking for more is refused before anything is allocated
MEMBER_ARCHITECTURES = ("fastconv", "lenet")  # single image classifiers with a traceable forward


@dataclasses.dataclass
class ImageEnsembleConfig:
    member_architecture: str = "fastconv"
    member_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the members' shared config
    members: int = 2

    def __post_init__(self) -> None:
        if not 2 <= self.members <= MAX_MEMBERS:
            raise ValueError(f"an ensemble has 2 to {MAX_MEMBERS} members, not {self.members}")
        if self.member_architecture not in MEMBER_ARCHITECTURES:
            raise ValueError(f"an ensemble's members are one of {', '.join(MEMBER_ARCHITECTURES)}, "
                             f"not {self.member_architecture!r}")
        if not isinstance(self.member_config, dict):
            raise ValueError("an ensemble's member_config must be an object")


class ImageEnsemble(nn.Module):
    traceable: ClassVar[bool] = True  # a fixed sequence of members of traceable architectures

    def __init__(self, config: ImageEnsembleConfig) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(build_model(config.member_architecture, dict(config.member_config))
                                     for _ in range(config.members))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, classes)
        return torch.stack([member(images=images) for member in self.members]).mean(dim=0)


@register_model("image_ensemble", ImageEnsembleConfig)
def build_image_ensemble(config: ImageEnsembleConfig) -> nn.Module:
    return ImageEnsemble(config)
