"""The trunk image model's flip test-time view: an average of the image and its mirror, in eval only."""

from __future__ import annotations

import torch

from models import build_model


def test_the_flip_view_averages_an_image_and_its_mirror_only_when_evaluating_images() -> None:
    torch.manual_seed(0)
    plain = build_model("trunk", {"dim": 32, "depth": 1, "heads": 2, "stem_width": 8}).eval()
    viewed = build_model("trunk", {"dim": 32, "depth": 1, "heads": 2, "stem_width": 8, "tta_flip": True}).eval()
    viewed.load_state_dict(plain.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = (plain(images) + plain(images.flip(-1))) / 2
        assert torch.allclose(viewed(images), expected, atol=1e-5)
        assert torch.allclose(viewed(images), viewed(images.flip(-1)), atol=1e-5)  # mirror-invariant
    viewed.train()
    with torch.no_grad():
        assert torch.allclose(viewed(images), plain.train()(images), atol=1e-5)  # training sees one view
