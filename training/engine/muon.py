"""The ``muon`` optimizer: orthogonalised momentum for convolution filters, Nesterov SGD for the rest.

Muon (Keller Jordan, 2024) replaces a filter bank's momentum update by the nearest semi-orthogonal
matrix (a few Newton–Schulz iterations), so every direction of the update moves at one rate; on
CIFAR-10 it reaches airbench94's accuracy in about a fifth fewer epochs. Filters are rescaled to a
fixed norm before each step (BatchNorm after them makes the scale irrelevant, and a pinned norm
keeps the step size an angle). The other parameters follow the published split: BatchNorm biases
and the head by Nesterov SGD at their own rates; BatchNorm scales stay at 1.

Both halves live in one ``torch.optim.Optimizer`` (param groups tagged ``muon``) so the training
loop's resumable state saves and restores them like any other optimizer. Each group's ``lr_scale``
is its rate relative to the loop's ``lr`` (the Muon rate), so one schedule drives all of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The published ratios (airbench94_muon, batch 2000, summed loss), translated to this project's mean
# loss and head scale: SGD's rates grow with the batch (a mean divides the gradient by it) and the
# head's shrinks by (9/256)² (its logits are scaled by 1/9 here, by 1/256 with a unit-std head there).
MUON_MOMENTUM = 0.6
SGD_MOMENTUM = 0.85
BIAS_RATE_PER_EXAMPLE = 0.053
HEAD_RATE_PER_EXAMPLE = 0.67 * (9 / 256) ** 2
DECAY_PER_EXAMPLE = 2e-6  # decoupled: each step shrinks the SGD-trained weights by this × batch × schedule
NEWTON_SCHULZ_STEPS = 3


def orthogonalize(update: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """The semi-orthogonal matrix nearest ``update`` (rows × columns), approximately: a quintic
    Newton–Schulz iteration whose coefficients push every singular value towards 1 quickly."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.float() / (update.norm() + eps)
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``muon=True`` (4-D filters), Nesterov SGD with weight decay for the others."""

    def __init__(self, groups: list[dict[str, Any]], lr: float) -> None:
        super().__init__(groups, {"lr": lr, "momentum": SGD_MOMENTUM, "weight_decay": 0.0, "muon": False,
                                  "lr_scale": 1.0})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                gradient = parameter.grad
                if not group["muon"] and group["weight_decay"]:
                    gradient = gradient.add(parameter, alpha=group["weight_decay"])
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(gradient)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(gradient)
                nesterov = gradient.add(buffer, alpha=momentum)
                if group["muon"]:
                    parameter.mul_(len(parameter) ** 0.5 / parameter.norm())  # pin each bank's norm
                    nesterov = orthogonalize(nesterov.reshape(len(nesterov), -1)).view_as(parameter)
                parameter.add_(nesterov, alpha=-lr)


def muon_param_groups(model: nn.Module, batch_size: int, lr: float) -> list[dict[str, Any]]:
    """Filters (4-D) → Muon; other matrices (the head) and biases → SGD at the published rates relative
    to ``lr``. BatchNorm scales are frozen on ``model`` (``requires_grad`` off) at their initial 1: the
    filters' norm is pinned instead, and a scale nothing updates should not cost a gradient."""
    filters, matrices, biases = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim == 4:
            filters.append(parameter)
        elif parameter.ndim >= 2:
            matrices.append(parameter)
        elif isinstance(_owner(model, name), nn.modules.batchnorm._BatchNorm) and name.endswith("weight"):
            parameter.requires_grad_(False)
        else:
            biases.append(parameter)
    bias_rate, head_rate = BIAS_RATE_PER_EXAMPLE * batch_size, HEAD_RATE_PER_EXAMPLE * batch_size
    decay = DECAY_PER_EXAMPLE * batch_size
    groups = [{"params": filters, "muon": True, "momentum": MUON_MOMENTUM, "lr_scale": 1.0},
              {"params": biases, "lr_scale": bias_rate / lr, "weight_decay": decay / bias_rate},
              {"params": matrices, "lr_scale": head_rate / lr, "weight_decay": decay / head_rate}]
    return [group for group in groups if group["params"]]


def _owner(model: nn.Module, parameter_name: str) -> nn.Module:
    return model.get_submodule(parameter_name.rpartition(".")[0])
