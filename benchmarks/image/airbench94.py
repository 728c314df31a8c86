"""airbench94 (Keller Jordan, 2024: "94% on CIFAR-10 in 3.29 seconds on an A100"), reimplemented here
from its published description as the reference for the efficiency comparison of issue 22.

What makes it airbench94, as published: a frozen 2×2 patch-whitening stem (its bias trained for the
first 3 epochs), three conv groups 64/256/256 (conv → max-pool → BatchNorm → GELU → conv → BatchNorm →
GELU) with identity-initialised convolutions and BatchNorm without a scale, max-pool 3 and a linear head
scaled by 1/9; Nesterov SGD at batch 1024 (lr 11.5 and weight decay 0.0153 per 1024 examples, BatchNorm
biases at 64× the rate), summed label-smoothed (0.2) cross-entropy, a warm-up over 23% of the steps
from 0.2× and a linear decay to 0.07×, Lookahead (every 5 steps, its decay rising with the cube of
progress), alternating flips and 2-pixel reflect-padded translation, 9.9 epochs, and test-time
augmentation over the mirror and two one-pixel shifts.

What differs here, on purpose: the data pipeline is this project's (seed 0 throughout) (the same JPEGs, split and
augmentation code as ``pretrain-image``), the precision is the one this CPU trains in (bfloat16
autocast, as the default recipe), and ``--budget-seconds`` sets the number of epochs so that the run
takes a given time on this machine (timed on a few steps of a throwaway copy first): the comparison is
at equal CPU time, not at equal epochs.

    python benchmarks/image/airbench94.py --data DATA/train --budget-seconds 1290
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.precision import native_autocast_dtype
from models.preprocessing import ImagePreprocessing
from training.engine.loop import seeded_generator
from training.image.data import augment, load_image_folder, stratified_split


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The published hyperparameters."""

    epochs: float = 9.9
    batch_size: int = 1024
    lr: float = 11.5  # per 1024 examples
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1024 examples, decoupled from the rate
    bias_scaler: float = 64.0
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3
    widths: tuple[int, int, int] = (64, 256, 256)
    batchnorm_momentum: float = 0.6
    scaling_factor: float = 1 / 9


HYPER = Hyper()


class BatchNormNoScale(nn.BatchNorm2d):
    def __init__(self, features: int) -> None:
        super().__init__(features, eps=1e-12, momentum=1 - HYPER.batchnorm_momentum)
        self.weight.requires_grad = False  # a fixed scale of 1: only the bias learns


class IdentityConv(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        weight = self.weight.data
        nn.init.dirac_(weight[:weight.size(1)])  # the first in_channels filters pass their input through


class Group(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1, self.pool = IdentityConv(in_channels, out_channels), nn.MaxPool2d(2)
        self.norm1, self.conv2 = BatchNormNoScale(out_channels), IdentityConv(out_channels, out_channels)
        self.norm2, self.act = BatchNormNoScale(out_channels), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = HYPER.widths
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.act = nn.GELU()
        self.groups = nn.Sequential(Group(24, widths[0]), Group(widths[0], widths[1]), Group(widths[1], widths[2]))
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[2], 10, bias=False)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12).float()
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.weight.requires_grad = False
        assert self.whiten.bias is not None
        self.whiten.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act(self.whiten(images)))
        return self.head(self.pool(x).flatten(1)) * HYPER.scaling_factor


def tta_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mirror + one-pixel shifts: the centred pair weighs 1/2, each shifted pair 1/4."""
    def mirrored(batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(batch) + model(batch.flip(-1)))
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = 0.5 * (mirrored(padded[..., :-2, :-2]) + mirrored(padded[..., 2:, 2:]))
    return 0.5 * mirrored(images) + 0.5 * shifted


class Lookahead:
    def __init__(self, model: nn.Module) -> None:
        self.slow = {name: value.detach().clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.slow[name].lerp_(value, 1 - decay)
                value.copy_(self.slow[name])


def optimizer_for(model: AirbenchNet) -> torch.optim.SGD:
    momentum, batch = HYPER.momentum, HYPER.batch_size
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr = HYPER.lr / kilostep  # the published per-1024-example rate, as PyTorch's SGD takes it
    decay = HYPER.weight_decay * batch / kilostep
    norm_biases = [p for name, p in model.named_parameters() if "norm" in name and p.requires_grad]
    others = [p for name, p in model.named_parameters() if "norm" not in name]  # the whitening bias too
    bias_lr = lr * HYPER.bias_scaler
    return torch.optim.SGD([{"params": norm_biases, "lr": bias_lr, "weight_decay": decay / bias_lr},
                            {"params": others, "lr": lr, "weight_decay": decay / lr}],
                           momentum=momentum, nesterov=True)


def lr_factor(step: int, total: int) -> float:
    warmup = int(total * 0.23)
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return 1.0 + (0.07 - 1.0) * (step - warmup) / max(total - warmup, 1)


def batches(images: torch.Tensor, labels: torch.Tensor, epoch: int, flips: torch.Tensor,
            preprocessing: ImagePreprocessing) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    batch = HYPER.batch_size
    order = torch.randperm(len(images), generator=seeded_generator(0, epoch))
    for step in range(len(images) // batch):
        indices = order[step * batch:(step + 1) * batch]
        augmented = augment(images[indices], seeded_generator(0, epoch, step), flips=flips[indices] ^ bool(epoch % 2))
        yield preprocessing.normalize(augmented).contiguous(memory_format=torch.channels_last), labels[indices]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               dtype: torch.dtype | None) -> float:
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(images).float(), labels, label_smoothing=HYPER.label_smoothing,
                               reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()) / len(labels)


def seconds_per_step(model: AirbenchNet, train: Any, flips: torch.Tensor, preprocessing: ImagePreprocessing,
                     dtype: torch.dtype | None) -> float:
    """Six steps of a throwaway copy, batches and Lookahead included: what one step costs here, to size
    the run to a time budget (the first step pays one-off costs and is not counted)."""
    probe = copy.deepcopy(model).train()
    optimizer, lookahead = optimizer_for(probe), Lookahead(probe)
    source = batches(train.images, train.labels, 0, flips, preprocessing)
    train_step(probe, optimizer, *next(source), dtype)
    started = time.perf_counter()
    for _ in range(5):
        train_step(probe, optimizer, *next(source), dtype)
    lookahead.update(probe, 0.5)
    return (time.perf_counter() - started) / 5


def run(data: Path, budget_seconds: float | None, epochs: float, seed: int = 0) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(seed)
    dataset = load_image_folder(data)
    train_idx, val_idx = stratified_split(dataset.labels, 0.1, 0)  # pretrain-image's split
    train, validation = dataset.subset(train_idx), dataset.subset(val_idx)
    preprocessing = ImagePreprocessing.from_images(train.images, 32)
    dtype = native_autocast_dtype(torch.device("cpu"))
    model = AirbenchNet()
    model.init_whitening(preprocessing.normalize(train.images[:5000]))
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    flips = torch.rand(len(train), generator=seeded_generator(0, 0xF1)) < 0.5
    steps_per_epoch = len(train) // HYPER.batch_size
    if budget_seconds is not None:
        step_seconds = seconds_per_step(model, train, flips, preprocessing, dtype)
        evaluation_seconds = 4 * step_seconds  # 5,000 images, four views, forward only: about four steps
        left = budget_seconds - (time.perf_counter() - started) - evaluation_seconds
        epochs = max(left / (step_seconds * steps_per_epoch), 0.1)
    total_steps = math.ceil(epochs * steps_per_epoch)
    optimizer = optimizer_for(model)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    lookahead = Lookahead(model)
    alpha = 0.95 ** 5 * (torch.arange(total_steps + 1) / total_steps) ** 3
    step, history = 0, []
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        model.train()
        assert model.whiten.bias is not None
        model.whiten.bias.requires_grad = epoch < HYPER.whiten_bias_epochs
        losses = []
        for images, labels in batches(train.images, train.labels, epoch, flips, preprocessing):
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * lr_factor(step, total_steps)
            losses.append(train_step(model, optimizer, images, labels, dtype))
            step += 1
            if step % 5 == 0:
                lookahead.update(model, float(alpha[step]))
            if step >= total_steps:
                break
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                        "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(history[-1]), flush=True)
        if step >= total_steps:
            break
    lookahead.update(model, 1.0)  # the slow weights are the result
    model.eval()
    plain, tta = [], []
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        for start in range(0, len(validation), 1000):
            images = preprocessing.normalize(validation.images[start:start + 1000]).contiguous(
                memory_format=torch.channels_last)
            plain.append(model(images).float())
            tta.append(tta_logits(model, images).float())
    labels = validation.labels
    return {"recipe": "airbench94", "epochs": round(total_steps / steps_per_epoch, 2), "steps": total_steps,
            "wall_seconds": round(time.perf_counter() - started, 1), "precision": str(dtype or torch.float32),
            "val_accuracy": float((torch.cat(tta).argmax(1) == labels).float().mean()),
            "val_accuracy_without_tta": float((torch.cat(plain).argmax(1) == labels).float().mean()),
            "validation_images": len(labels), "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the CIFAR-10 training split (ImageFolder)")
    parser.add_argument("--epochs", type=float, default=HYPER.epochs)
    parser.add_argument("--budget-seconds", type=float, help="size the run to take this long (overrides --epochs)")
    parser.add_argument("--output", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    result = run(args.data, args.budget_seconds, args.epochs)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
