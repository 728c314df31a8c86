"""The training loop shared by every task: seeded, resumable, mixed precision, optionally DDP.

A task supplies a ``BatchSource``: for (epoch, step) it yields ``(inputs, labels)`` where
``inputs`` is a tuple of tensors passed to ``model(*inputs)``. Batches are a pure function of
(seed, epoch, step), so a run killed mid-epoch resumes at the exact batch it stopped at, from the
state saved every ``save_every_steps`` steps (weights, optimizer, schedule, history; safetensors +
JSON, written atomically).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from models.checkpoint import publish_directory
from models.precision import native_autocast_dtype
from training.engine.muon import Muon, muon_param_groups

logger = logging.getLogger(__name__)

Batch = tuple[tuple[torch.Tensor | None, ...], torch.Tensor]


class BatchSource(Protocol):
    def steps_per_epoch(self) -> int: ...

    def batch(self, epoch: int, step: int, rank: int, world_size: int) -> Batch: ...


@dataclasses.dataclass
class LoopConfig:
    epochs: int = 10
    # sgd (Nesterov) | adamw | muon (training.engine.muon: lr is the filters' rate; its momenta, the
    # other groups' rates and weight decay are the published ones, so momentum and weight_decay do not apply)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_fraction: float = 0.2
    schedule: str = "linear"  # linear | cosine (decay to zero after warm-up) | constant
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0
    save_every_steps: int = 50
    grad_clip: float = 0.0
    class_weights: list[float] | None = None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return native_autocast_dtype(device)


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator whose state depends only on ``parts`` (seed, epoch, step …)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**62)
    return torch.Generator().manual_seed(seed)


def distributed_context() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases (1-D tensors)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: LoopConfig, batch_size: int | None = None) -> torch.optim.Optimizer:
    """The loop's optimizer; ``muon`` sets its other rates per example, so it needs the batch size."""
    if config.optimizer == "muon":
        if batch_size is None:
            raise ValueError("the muon optimizer needs the batch source's batch_size")
        return Muon(muon_param_groups(model, batch_size, config.lr), lr=config.lr)
    groups = _param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))
    raise ValueError(f"unknown optimizer {config.optimizer!r} (sgd, adamw or muon)")


def lr_factor(step: int, total: int, config: LoopConfig) -> float:
    warmup = max(1, int(total * config.warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1 - progress)


# ---- resumable state ------------------------------------------------------------------------

def save_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    save_file(tensors, str(staging / "state.safetensors"))
    (staging / "state.json").write_text(json.dumps({
        "progress": progress, "optimizer_scalars": scalars, "param_groups": [
            {k: v for k, v in group.items() if k != "params"} for group in optimizer_state["param_groups"]
        ],
    }))
    publish_directory(staging, directory)


def load_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    tensors = load_file(str(directory / "state.safetensors"))
    meta = json.loads((directory / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    for group, saved in zip(groups, meta["param_groups"], strict=True):
        group.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return dict(meta["progress"])


# ---- the loop --------------------------------------------------------------------------------

def keep_frozen_norm_statistics(model: nn.Module) -> None:
    """Batch norms whose parameters are frozen keep their running statistics (eval mode) in training:
    a frozen backbone must compute the features it was trained with, not a small batch's."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parameters = list(module.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()


@torch.inference_mode()
def predict_logits(
    model: nn.Module, batches: Iterator[Batch], device: torch.device, precision: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated (logits, labels) of ``model`` in eval mode over ``batches``."""
    model.eval()
    dtype = autocast_dtype(precision, device)
    all_logits, all_labels = [], []
    for inputs, labels in batches:
        inputs = tuple(None if x is None else x.to(device) for x in inputs)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            all_logits.append(model(*inputs).float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def fit(
    model: nn.Module,
    source: BatchSource,
    config: LoopConfig,
    *,
    device: torch.device,
    validate: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]] | None = None,
    state_dir: Path | None = None,
    stop_after_steps: int | None = None,
    description: str = "train",
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns the per-epoch history (loss, accuracy, time, validation).

    ``stop_after_steps`` ends the run early (as a kill would), leaving the saved state behind.
    """
    rank, world_size = distributed_context()
    torch.manual_seed(config.seed)
    model.to(device)
    optimizer = make_optimizer(model, config, getattr(source, "batch_size", None))
    steps_per_epoch = source.steps_per_epoch()
    total_steps = config.epochs * steps_per_epoch
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    if state_dir is not None and (state_dir / "state.json").is_file():
        progress = load_training_state(state_dir, model, optimizer)
        if rank == 0:
            logger.info("resuming from %s at epoch %d step %d", state_dir, progress["epoch"], progress["step"])
    train_model: nn.Module = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = autocast_dtype(config.precision, device)
    weights = torch.tensor(config.class_weights, device=device) if config.class_weights else None
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    steps_done = 0
    while progress["epoch"] < config.epochs:
        epoch = progress["epoch"]
        model.train()
        keep_frozen_norm_statistics(model)
        started = time.perf_counter() - progress.get("epoch_seconds", 0.0)
        loss_sum, correct, seen = progress.get("loss_sum", 0.0), progress.get("correct", 0), progress.get("seen", 0)
        bar = tqdm(range(progress["step"], steps_per_epoch), desc=f"{description} {epoch + 1}/{config.epochs}",
                   disable=rank != 0, leave=False, dynamic_ncols=True)
        for step in bar:
            global_step = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:  # a group's lr_scale: its rate relative to config.lr (muon)
                group["lr"] = config.lr * group.get("lr_scale", 1.0) * lr_factor(global_step, total_steps, config)
            inputs, labels = source.batch(epoch, step, rank, world_size)
            inputs = tuple(None if x is None else x.to(device, non_blocking=True) for x in inputs)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = train_model(*inputs)
            loss = F.cross_entropy(logits.float(), labels, weight=weights, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            steps_done += 1
            progress.update(step=step + 1, loss_sum=loss_sum, correct=correct, seen=seen,
                            epoch_seconds=time.perf_counter() - started)
            should_save = state_dir is not None and rank == 0 and (step + 1) % config.save_every_steps == 0
            if should_save and state_dir is not None:
                save_training_state(state_dir, model, optimizer, progress)
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                if state_dir is not None and rank == 0:
                    save_training_state(state_dir, model, optimizer, progress)
                return list(progress["history"])
        bar.close()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
               "seconds": time.perf_counter() - started, "lr_peak": config.lr}
        if validate is not None and rank == 0:
            logits, labels = validate(model)
            row["val_loss"] = float(F.cross_entropy(logits, labels))
            row["val_accuracy"] = float((logits.argmax(dim=1) == labels).float().mean())
        if rank == 0:
            logger.info("epoch %d/%d %s", epoch + 1, config.epochs,
                        " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
        progress = {"epoch": epoch + 1, "step": 0, "history": [*progress["history"], row]}
        if state_dir is not None and rank == 0:
            save_training_state(state_dir, model, optimizer, progress)
    return list(progress["history"])


def discard_training_state(state_dir: Path | None) -> None:
    """Remove the resumable state once the finished checkpoint is safely written."""
    if state_dir is not None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(state_dir)
