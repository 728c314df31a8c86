"""The muon optimizer: what it orthogonalises, what it leaves alone, and that a run with it resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model
from training.engine.loop import LoopConfig, fit, make_optimizer
from training.engine.muon import Muon, orthogonalize


def test_orthogonalize_pulls_every_singular_value_towards_one() -> None:
    generator = torch.Generator().manual_seed(0)
    skewed = torch.randn(64, 300, generator=generator) * torch.logspace(-3, 1, 300)  # condition number ~1e4
    singular_values = torch.linalg.svdvals(orthogonalize(skewed, steps=5))
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3
    assert torch.linalg.svdvals(orthogonalize(skewed.T, steps=5)).max() < 1.3  # tall matrices too


def _small_fastconv() -> torch.nn.Module:
    return build_model("fastconv", {"num_classes": 3, "widths": [8, 16, 16], "tta_flip": False,
                                    "identity_init": True})


class _Blobs:
    """Three classes told apart by their mean colour: learnable in a few steps."""

    batch_size = 12

    def steps_per_epoch(self) -> int:
        return 4

    def batch(self, epoch: int, step: int, rank: int, world_size: int):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(epoch * 100 + step)
        labels = torch.arange(self.batch_size) % 3
        images = torch.randn(self.batch_size, 3, 32, 32, generator=generator)
        images[torch.arange(self.batch_size), labels] += 2.0
        return (images,), labels


def _loop(epochs: int) -> LoopConfig:
    return LoopConfig(epochs=epochs, optimizer="muon", lr=0.24, warmup_fraction=0.0, precision="fp32",
                      label_smoothing=0.2, save_every_steps=1)


def test_muon_trains_filters_on_a_pinned_norm_keeps_norm_scales_and_learns() -> None:
    torch.manual_seed(0)
    model = _small_fastconv()
    norm_scales = [m.weight.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    history = fit(model, _Blobs(), _loop(3), device=torch.device("cpu"))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_accuracy"] > 0.9
    filters = model.groups[1].conv2.weight  # (out, in, 3, 3): each step starts from norm √out
    assert abs(float(filters.detach().norm()) - len(filters) ** 0.5) / len(filters) ** 0.5 < 0.5
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, before) for m, before in zip(batch_norms, norm_scales, strict=True))
    assert not any(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in batch_norms)


def test_muon_groups_filters_apart_and_needs_the_batch_size() -> None:
    model = _small_fastconv()
    optimizer = make_optimizer(model, _loop(1), batch_size=2000)
    assert isinstance(optimizer, Muon)
    muon_group, bias_group, head_group = optimizer.param_groups
    assert muon_group["muon"] and all(p.ndim == 4 for p in muon_group["params"])
    assert head_group["params"] == [model.head.weight]
    assert all(p.ndim == 1 for p in bias_group["params"])
    # the published rates per example: BatchNorm biases 0.053 × batch (here relative to the muon rate)
    assert bias_group["lr_scale"] * 0.24 == pytest.approx(0.053 * 2000)
    with pytest.raises(ValueError, match="batch_size"):
        make_optimizer(_small_fastconv(), _loop(1))


def test_a_muon_run_killed_mid_way_resumes_to_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight = _small_fastconv()
    fit(straight, _Blobs(), _loop(2), device=torch.device("cpu"))

    torch.manual_seed(0)
    killed = _small_fastconv()
    fit(killed, _Blobs(), _loop(2), device=torch.device("cpu"), state_dir=tmp_path / "state", stop_after_steps=5)
    torch.manual_seed(0)
    resumed = _small_fastconv()
    fit(resumed, _Blobs(), _loop(2), device=torch.device("cpu"), state_dir=tmp_path / "state")
    for name, value in straight.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[name].float(), atol=1e-5), name
