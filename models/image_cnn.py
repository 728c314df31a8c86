"""Convolutional image classifiers: the seed's LeNet baseline and the fast default CNN.

The default (``fastconv``) follows the lessons of the published fast CIFAR-10 work (a frozen
patch-whitening stem, three conv groups with max-pooling and BatchNorm, a max-pooled head scaled
down so label-smoothed logits stay small) but is written from those ideas, not from their code.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from models.registry import register_model


@dataclasses.dataclass
class LeNetConfig:
    num_classes: int = 10
    in_channels: int = 3


class LeNet(nn.Module):
    """The seed's network: conv 6 → 16, fc 120 → 84 → classes, on 32×32 inputs."""

    # forward is a pure function of the image tensor, so a TorchScript trace is exact (app.tracing)
    traceable: ClassVar[bool] = True

    def __init__(self, config: LeNetConfig) -> None:
        super().__init__()
        self.config = config
        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, config.num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, 32, 32) → (B, classes)
        return self.classifier(self.features(images))

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier[-1] = nn.Linear(84, num_classes)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)


@register_model("lenet", LeNetConfig)
def build_lenet(config: LeNetConfig) -> nn.Module:
    return LeNet(config)


@dataclasses.dataclass
class FastConvConfig:
    num_classes: int = 10
    in_channels: int = 3
    widths: tuple[int, ...] = (64, 256, 256)
    whiten_kernel: int = 2
    logit_scale: float = 1 / 9
    # Average the logits of the image and its mirror image at eval time (test-time augmentation).
    tta_flip: bool = True
    # Also average over the image shifted one pixel up-left and down-right (reflect-padded): the
    # centred view weighs 1/2, each shifted one 1/4. Three times the inference cost, ~+0.3 points.
    tta_translate: bool = False
    # Start each convolution as the identity on its first input channels (the rest random): a
    # training-time choice (airbench's), recorded because it is part of the recipe.
    identity_init: bool = False


class ConvGroup(nn.Module):
    """conv → max-pool → BN → GELU → conv → BN → GELU: halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int, identity_init: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding="same", bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(out_channels, momentum=0.4)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding="same", bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels, momentum=0.4)
        self.act = nn.GELU()
        if identity_init:
            for conv in (self.conv1, self.conv2):
                with torch.no_grad():  # (out, in, 3, 3): filter i passes input channel i through
                    nn.init.dirac_(conv.weight[:min(conv.in_channels, conv.out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastConvNet(nn.Module):
    traceable: ClassVar[bool] = True  # see LeNet

    def __init__(self, config: FastConvConfig) -> None:
        super().__init__()
        self.config = config
        k = config.whiten_kernel
        whiten_width = 2 * config.in_channels * k * k
        # Set from data by ``init_whitening`` and then frozen: decorrelated inputs train faster.
        self.whiten = nn.Conv2d(config.in_channels, whiten_width, k, padding=0, bias=True)
        self.act = nn.GELU()
        groups = []
        in_channels = whiten_width
        for width in config.widths:
            groups.append(ConvGroup(in_channels, width, config.identity_init))
            in_channels = width
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(in_channels, config.num_classes, bias=False)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to the ZCA-like whitening of the k×k patches of ``images`` (B, C, H, W)."""
        k = self.config.whiten_kernel
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H', W', k, k)
        patches = patches.transpose(1, 3).reshape(-1, self.config.in_channels * k * k)
        patches = patches - patches.mean(dim=0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None])
        filters = filters.reshape(-1, self.config.in_channels, k, k)
        # unfold above ordered the patch as (C, kh, kw) after the transposes: (W', H') swap only
        # touches spatial batch axes, so this reshape matches Conv2d's (out, C, kh, kw) layout.
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        assert self.whiten.bias is not None
        self.whiten.bias.zero_()
        self.whiten.requires_grad_(False)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, width)
        x = self.act(self.whiten(images))
        x = self.groups(x)  # (B, width, h, w)
        return torch.amax(x, dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, classes)
        return self.head(self.pooled(images)) * self.config.logit_scale

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_classes, bias=False)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def _test_time_views(self, images: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Every test-time view in one batch (V·B, C, H, W) and the weight of each view."""
        views, weights = [images], [1.0]
        if self.config.tta_translate:
            height, width = images.shape[-2:]
            padded = nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
            views += [padded[..., :height, :width], padded[..., 2:, 2:]]  # shifted up-left, down-right
            weights = [0.5, 0.25, 0.25]
        if self.config.tta_flip:
            views += [view.flip(-1) for view in views]
            weights = [w / 2 for w in weights] * 2
        return torch.cat(views).contiguous(memory_format=torch.channels_last), weights

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training or not (self.config.tta_flip or self.config.tta_translate):
            return self.logits(images)
        # Every test-time view goes through the network in one batch: (V·B, C, H, W) keeps the
        # convolutions busy where V passes of a small batch would mostly pay per-call overhead.
        batch, weights = self._test_time_views(images)
        logits = self.logits(batch).view(len(weights), images.shape[0], -1)  # (V, B, classes)
        weight = torch.tensor(weights, dtype=logits.dtype, device=logits.device).view(-1, 1, 1)
        return (logits * weight).sum(dim=0)  # (B, classes)

    def head_features(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, width)
        """What the head reads, averaged over the test-time views as ``forward`` averages logits
        (the head is linear, so a head fitted on these gives ``forward``'s logits exactly)."""
        batch, weights = self._test_time_views(images) if not self.training else (images, [1.0])
        features = self.pooled(batch).view(len(weights), images.shape[0], -1)  # (V, B, width)
        weight = torch.tensor(weights, dtype=features.dtype, device=features.device).view(-1, 1, 1)
        return (features * weight).sum(dim=0) * self.config.logit_scale  # (B, width)

    def set_head(self, weight: torch.Tensor) -> None:
        """Install a head fitted on ``head_features``: logits = head_features @ weight.T."""
        with torch.no_grad():
            self.head.weight.copy_(weight)


@register_model("fastconv", FastConvConfig)
def build_fastconv(config: FastConvConfig) -> nn.Module:
    return FastConvNet(config)
