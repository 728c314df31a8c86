"""TorchScript for the service (image models traced, the n-gram text model scripted): exact against eager, or not used at all."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from app.settings import Settings
from app.tasks import RUNNERS, ImageRunner, TaskRunner, TextRunner
from app.tracing import script_text_model, trace_image_model
from models import build_model
from models.checkpoint import LoadedCheckpoint, load_checkpoint

BUNDLED_IMAGE_MODEL = Path(__file__).resolve().parents[2] / "checkpoints" / "cifar10-fastconv"
BUNDLED_TEXT_MODEL = BUNDLED_IMAGE_MODEL.parent / "20news-text"


def _eager_and_compiled(task: str, directory: Path) -> tuple[LoadedCheckpoint, TaskRunner, TaskRunner]:
    """The bundled checkpoint and two runners of it: TRACE_MODELS off, and the default (on)."""
    checkpoint = load_checkpoint(directory)
    device = torch.device("cpu")
    eager = RUNNERS[task](checkpoint, device, Settings(model_dir=directory.parent, trace_models=False))
    compiled = RUNNERS[task](checkpoint, device, Settings(model_dir=directory.parent))
    assert compiled.compiled is None and compiled.compile_pending  # built after the service turns ready
    assert not eager.compile() and eager.compiled is None
    assert compiled.compile() and not compiled.compile()  # built once
    return checkpoint, eager, compiled


def test_the_bundled_image_model_is_served_traced_with_the_eager_outputs() -> None:
    checkpoint, eager, traced = _eager_and_compiled("image", BUNDLED_IMAGE_MODEL)
    assert isinstance(traced, ImageRunner) and isinstance(eager, ImageRunner)
    assert traced.compiled is not None and eager.compiled is None
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    dtype = traced.autocast_dtype
    for size in (1, 5):  # traced at batch 2: other batch sizes must give the same numbers
        batch = traced.collate(list(images[:size]))
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            expected, got = eager.forward(checkpoint.model, batch), traced.forward(checkpoint.model, batch)
        assert got.shape == (size, 10)
        torch.testing.assert_close(got.float(), expected.float())


class _BranchesOnData(nn.Module):
    """What a trace cannot follow: the branch taken depends on the input's values."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = images.mean(dim=(2, 3))
        return pooled * 2 if float(pooled.sum()) > 0 else pooled + 5


def test_a_model_whose_trace_differs_from_eager_stays_eager() -> None:
    positive, negative = torch.ones(2, 3, 4, 4), -torch.ones(3, 3, 4, 4)
    assert trace_image_model(_BranchesOnData(), positive, negative, None) is None
    assert trace_image_model(_BranchesOnData(), positive, positive[:1] * 3, None) is not None


def test_only_architectures_that_declare_a_pure_forward_are_traced(monkeypatch) -> None:
    checkpoint = load_checkpoint(BUNDLED_IMAGE_MODEL)
    monkeypatch.setattr(type(checkpoint.model), "traceable", False)  # as a model with side effects says
    runner = RUNNERS["image"](checkpoint, torch.device("cpu"), Settings(model_dir=BUNDLED_IMAGE_MODEL.parent))
    assert isinstance(runner, ImageRunner) and not runner.compile() and runner.compiled is None


def test_the_bundled_text_model_is_served_scripted_with_the_eager_outputs() -> None:
    checkpoint, eager, scripted = _eager_and_compiled("text", BUNDLED_TEXT_MODEL)
    assert isinstance(scripted, TextRunner) and isinstance(eager, TextRunner)
    assert scripted.compiled is not None and eager.compiled is None
    texts = ["Subject: shuttle launch\n\nThe shuttle launch was delayed by the weather at the Cape.",
             "Which graphics card runs X11 fastest?", "goalie", "zzzqqq unknownword"]
    payloads = [torch.tensor(ids) for ids in scripted.encoder.ids(scripted.encoder.tokenize(texts))]
    for size in (1, 4):  # one text; texts of different lengths (padding, unknown words, char n-grams)
        batch = scripted.collate(payloads[:size])
        with torch.inference_mode():
            expected, got = eager.forward(checkpoint.model, batch), scripted.forward(checkpoint.model, batch)
        assert got.shape == (size, 20)
        torch.testing.assert_close(got, expected)


def test_a_text_architecture_without_a_scripted_forward_stays_eager() -> None:
    bilstm = build_model("bilstm", {"vocab_size": 50, "num_classes": 3, "embedding_dim": 8, "hidden_size": 8})
    assert script_text_model(bilstm.eval(), torch.randint(2, 50, (2, 7))) is None


def test_a_cpu_batch_of_images_runs_in_slices_with_the_outputs_of_one_call() -> None:
    checkpoint = load_checkpoint(BUNDLED_IMAGE_MODEL)
    settings = Settings(model_dir=BUNDLED_IMAGE_MODEL.parent, trace_models=False)
    whole = RUNNERS["image"](checkpoint, torch.device("cpu"), settings.model_copy(update={"cpu_image_slice": 0}))
    sliced = RUNNERS["image"](checkpoint, torch.device("cpu"), settings.model_copy(update={"cpu_image_slice": 4}))
    assert isinstance(sliced, ImageRunner) and sliced.slice_size == 4 and whole.slice_size == 0
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    batch = whole.collate(list(images))
    calls: list[int] = []
    handle = checkpoint.model.register_forward_pre_hook(lambda _module, args, kwargs: calls.append(len(kwargs["images"])),
                                                        with_kwargs=True)
    with torch.inference_mode():
        expected = whole.forward(checkpoint.model, batch)
        got = sliced.forward(checkpoint.model, batch)
    handle.remove()
    assert calls == [10, 4, 3, 3]  # three near-equal slices of at most 4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_images_are_sliced_only_on_a_cpu() -> None:
    checkpoint = load_checkpoint(BUNDLED_IMAGE_MODEL)
    runner = RUNNERS["image"](checkpoint, torch.device("meta"), Settings(model_dir=BUNDLED_IMAGE_MODEL.parent))
    assert isinstance(runner, ImageRunner) and runner.slice_size == 0
