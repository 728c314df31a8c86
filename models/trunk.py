"""The modality-agnostic trunk: a small pre-norm Transformer encoder fed by modality adapters.

An adapter turns one modality into a sequence of ``dim``-wide tokens (images: a conv stem and
patchify plus learned positions; text: token embeddings plus learned positions). The trunk adds a
modality-type embedding, prepends a class token and encodes the sequence; the head reads the class
token. Everything under ``trunk.`` is shared across modalities, which is what lets a text model
start from an image checkpoint and a fusion model feed image and text tokens in one sequence.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from models.registry import register_model

MODALITIES = ("image", "text")
TRUNK_PREFIX = "trunk."


@dataclasses.dataclass
class TrunkConfig:
    num_classes: int = 10
    modalities: tuple[str, ...] = ("image",)
    # Small enough to pretrain on CIFAR-10 in ~15 minutes on 2 CPU cores.
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    # image adapter
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    stem_width: int = 32
    # text adapter
    vocab_size: int = 0
    max_text_tokens: int = 256
    padding_idx: int = 0
    # test-time view: an image model averages its logits over the image and its mirror
    tta_flip: bool = False


class ImageAdapter(nn.Module):
    """(B, C, H, W) images → (B, N, dim) patch tokens with learned positions."""

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, config.stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(config.stem_width),
            nn.GELU(),
            nn.Conv2d(config.stem_width, config.dim, config.patch_size, stride=config.patch_size),
        )
        num_patches = (config.image_size // config.patch_size) ** 2
        self.positions = nn.Parameter(torch.randn(1, num_patches, config.dim) * 0.02)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.stem(images).flatten(2).transpose(1, 2)  # (B, N, dim)
        padding = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens + self.positions[:, : tokens.shape[1]], padding


class TextAdapter(nn.Module):
    """(B, T) token ids (``padding_idx`` pads) → (B, T, dim) tokens and the padding mask."""

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("a text adapter needs vocab_size > 0")
        self.padding_idx = config.padding_idx
        self.max_tokens = config.max_text_tokens
        self.embedding = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.padding_idx)
        self.positions = nn.Parameter(torch.randn(1, config.max_text_tokens, config.dim) * 0.02)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        token_ids = token_ids[:, : self.max_tokens]
        tokens = self.embedding(token_ids) + self.positions[:, : token_ids.shape[1]]
        return tokens, token_ids == self.padding_idx


class Trunk(nn.Module):
    """Modality embeddings + class token + Transformer encoder + final norm."""

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.modality_embedding = nn.Parameter(torch.zeros(len(MODALITIES), config.dim))
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, int(config.dim * config.mlp_ratio), config.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, parts: list[tuple[str, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``parts``: (modality, tokens (B, N, dim), padding (B, N)) → class embedding (B, dim)."""
        batch = parts[0][1].shape[0]
        sequences = [self.class_token.expand(batch, -1, -1)]
        masks = [torch.zeros(batch, 1, dtype=torch.bool, device=parts[0][1].device)]
        for modality, tokens, padding in parts:
            sequences.append(tokens + self.modality_embedding[MODALITIES.index(modality)])
            masks.append(padding)
        x = self.encoder(torch.cat(sequences, dim=1), src_key_padding_mask=torch.cat(masks, dim=1))
        return self.norm(x[:, 0])


class TrunkClassifier(nn.Module):
    """Adapters for the configured modalities → shared trunk → linear head."""

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        unknown = set(config.modalities) - set(MODALITIES)
        if unknown or not config.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}")
        self.config = config
        adapters: dict[str, nn.Module] = {}
        if "image" in config.modalities:
            adapters["image"] = ImageAdapter(config)
        if "text" in config.modalities:
            adapters["text"] = TextAdapter(config)
        self.adapters = nn.ModuleDict(adapters)
        self.trunk = Trunk(config)
        self.head = nn.Linear(config.dim, config.num_classes)

    def embed(self, images: torch.Tensor | None = None, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if images is not None:
            parts.append(("image", *self.adapters["image"](images)))
        if token_ids is not None:
            parts.append(("text", *self.adapters["text"](token_ids)))
        if not parts:
            raise ValueError("need images or token_ids")
        return self.trunk(parts)  # (B, dim)

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.config.dim, num_classes)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def forward(self, images: torch.Tensor | None = None, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.training or not self.config.tta_flip or images is None or token_ids is not None:
            return self.head(self.embed(images, token_ids))  # (B, classes)
        # Both views in one batch: one pass of 2B keeps the matmuls busier than two passes of B.
        logits = self.head(self.embed(torch.cat([images, images.flip(-1)])))
        return logits.view(2, images.shape[0], -1).mean(dim=0)  # (B, classes)


@register_model("trunk", TrunkConfig)
def build_trunk(config: TrunkConfig) -> nn.Module:
    return TrunkClassifier(config)


def trunk_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared-trunk tensors of a TrunkClassifier state dict, without the ``trunk.`` prefix."""
    return {k[len(TRUNK_PREFIX):]: v for k, v in state_dict.items() if k.startswith(TRUNK_PREFIX)}


class TrunkTransferError(ValueError):
    """A checkpoint whose shared trunk cannot initialise another model's trunk."""


def copy_trunk(target: TrunkClassifier, source_state: dict[str, torch.Tensor], where: str = "checkpoint") -> list[str]:
    """Copy every shared-trunk tensor of ``source_state`` into ``target``; returns the copied names.

    Refuses (``TrunkTransferError``) a source without trunk tensors (another architecture) or whose
    trunk differs in any tensor name or shape (another dim, depth or MLP width).
    """
    source = trunk_state(source_state)
    if not source:
        raise TrunkTransferError(f"{where} has no shared trunk ('{TRUNK_PREFIX}*' tensors); "
                                 "transfer needs a checkpoint of the 'trunk' architecture")
    expected = trunk_state(target.state_dict())
    missing, extra = sorted(set(expected) - set(source)), sorted(set(source) - set(expected))
    if missing or extra:
        raise TrunkTransferError(f"{where}: trunk layout differs (missing {missing[:3]}, unexpected {extra[:3]}); "
                                 "is its depth the same?")
    for name, tensor in expected.items():
        if tensor.shape != source[name].shape:
            raise TrunkTransferError(f"{where}: trunk tensor {name} has shape {tuple(source[name].shape)}, "
                                     f"this model needs {tuple(tensor.shape)} (different dim or MLP width?)")
    with torch.no_grad():
        for name, tensor in target.trunk.state_dict().items():
            tensor.copy_(source[name])
    return sorted(source)
