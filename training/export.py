"""Exports a checkpoint for other runtimes: ``python -m training export CHECKPOINT --format onnx|torchscript|triton``.

The exported graph is the checkpoint's model with its calibration folded in: float32 inputs → the
calibrated probabilities (softmax(logits / temperature), then the top-label map where the manifest has one:
``models.calibration``), (B, classes), that the service answers with ``PRECISION=fp32`` (a text model's
score power is part of its logits already). Beside the graph,
``model.json`` says what a client sends and gets: the inputs and the output (names, dtypes, shapes,
``"batch"`` and ``"tokens"`` being dynamic axes), the classes, the preprocessing from the manifest, and
the lineage (checkpoint name and version, weights sha256, parent). A text or multimodal export also
carries the vocabulary files its preprocessing names. ``--format triton`` writes the ONNX graph as a
Triton model repository entry: ``DIR/<name>/config.pbtxt``, ``DIR/<name>/1/model.onnx``.

Nothing is published unchecked: the written graph is run (ONNX Runtime, or the TorchScript module
loaded back) on real inputs made with the project's own preprocessing (images decoded and
normalised as in training, texts tokenised with the checkpoint's own encoder, pairs collated by
``models.fusion.collate_fusion_batch``) and compared with the PyTorch model; a probability further
than ``TOLERANCE`` from the model's is an ``ExportError`` and nothing is written. Only the checkpoint
directory is read (through ``models.checkpoint``, which confines manifest file names to it), plus
``--samples`` when given.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from models.calibration import Calibration
from models.checkpoint import LoadedCheckpoint, load_checkpoint, publish_directory, read_extra_file, sha256_file
from models.fusion import (
    LateFusionClassifier,
    collate_fusion_batch,
    fusion_preprocessing,
    load_fusion_sentence_tokenizer,
    load_fusion_text_encoder,
)
from models.preprocessing import ImagePreprocessing
from models.text_encoding import PAD_ID, UNK_ID, TextEncoder, load_text_encoder
from training.image.data import decode_image

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |exported − PyTorch| on any calibrated probability
FORMATS = ("onnx", "torchscript", "triton")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "triton": "model.onnx"}
DESCRIPTION_FILE = "model.json"
LABELS_FILE = "labels.txt"
OUTPUT = "probabilities"
OPSET = 18  # what Triton's and most ONNX Runtime builds of the last years run
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
MAX_SAMPLES = 16  # of each kind read from --samples
SAMPLE_TEXTS = (
    "Subject: Shuttle launch delayed\nFrom: jane@example.org\nOrganization: NASA\n\nThe space shuttle launch was "
    "delayed again because of the weather; the orbiter stays on the pad until Friday.",
    "What a game last night! The goalie stopped forty shots and the team won the cup in overtime.",
    "Does anyone know a fast algorithm for rendering 3D graphics with ray tracing on a PC? Thanks.",
    "I love this sunny beach, best holiday ever :) so happy",
    "Terrible service, cold food and a rude waiter. Never again.",
    "the the the of of and and and space space",
)


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or an export that does not match the PyTorch model."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]  # a str names a dynamic axis

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}


# ---- the graph: the model with its calibration folded in ---------------------------------------

class _Calibrated(nn.Module):
    def __init__(self, model: nn.Module, calibration: Calibration) -> None:
        super().__init__()
        self.model = model
        self.calibration = calibration

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:  # (B, classes) → (B, classes)
        return self.calibration.probabilities(logits)  # as the service's worker does


class CalibratedImageModel(_Calibrated):
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) standardised → (B, classes)
        return self.calibrate(self.model(images=images))


class CalibratedTextModel(_Calibrated):
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # (B, T) ids, 0-padded → (B, classes)
        return self.calibrate(self.model(token_ids=token_ids))


class CalibratedLateFusion(_Calibrated):
    """``fusion_late`` without its branches on the masks' values: both sides always run, and ``fuse``
    multiplies each side by its mask, which zeroes an absent side as the eager forward's skipping does."""

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, image_mask: torch.Tensor, text_mask: torch.Tensor,
                sentence_ids: torch.Tensor | None = None) -> torch.Tensor:
        model = cast(LateFusionClassifier, self.model)
        image_scores = model.image_scores(model.image_features(images))  # (B, classes)
        text_scores = model.text_scores(token_ids, sentence_ids)  # (B, text width)
        return self.calibrate(model.fuse(image_scores, text_scores, image_mask, text_mask))


@dataclasses.dataclass
class ExportGraph:
    module: nn.Module
    inputs: list[TensorSpec]
    num_classes: int

    @property
    def output(self) -> TensorSpec:
        return TensorSpec(OUTPUT, torch.float32, ("batch", self.num_classes))


def build_graph(checkpoint: LoadedCheckpoint) -> ExportGraph:
    """The calibrated float32 module to export (a copy: ``checkpoint.model`` stays the reference)."""
    manifest = checkpoint.manifest
    calibration = Calibration.from_manifest(manifest.calibration)
    # float16-stored weights become float32 exactly: the copy computes what the model computes
    model = copy.deepcopy(checkpoint.model).float().eval()
    classes = len(manifest.classes)
    if manifest.task == "image":
        size = ImagePreprocessing.from_manifest(manifest).size
        image = TensorSpec("images", torch.float32, ("batch", 3, size, size))
        return ExportGraph(CalibratedImageModel(model, calibration), [image], classes)
    if manifest.task == "text":
        tokens = TensorSpec("token_ids", torch.int64, ("batch", "tokens"))
        return ExportGraph(CalibratedTextModel(model, calibration), [tokens], classes)
    if not isinstance(model, LateFusionClassifier):
        raise ExportError(f"{manifest.architecture!r} cannot be exported: its forward chooses which modalities to run "
                          "from the values of the presence masks, which a static graph cannot hold (fusion_late can)")
    size = fusion_preprocessing(manifest)[0].size
    inputs = [TensorSpec("images", torch.float32, ("batch", 3, size, size)),
              TensorSpec("token_ids", torch.int64, ("batch", "tokens")),
              TensorSpec("image_mask", torch.bool, ("batch",)), TensorSpec("text_mask", torch.bool, ("batch",))]
    if model.sentence_encoder is not None:
        inputs.append(TensorSpec("sentence_ids", torch.int64, ("batch", "pieces")))
    return ExportGraph(CalibratedLateFusion(model, calibration), inputs, classes)


# ---- real inputs to check the export on ----------------------------------------------------------

Batch = dict[str, torch.Tensor]


def _sample_files(samples: Path | None, images: bool) -> list[Path]:
    if samples is None:
        return []
    if not samples.exists():
        raise ExportError(f"--samples {samples}: no such file or directory")
    files = [samples] if samples.is_file() else sorted(  # hidden files and folders inside it skipped
        p for p in samples.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(samples).parts))
    return [p for p in files if (p.suffix.lower() in IMAGE_SUFFIXES) == images][:MAX_SAMPLES]


def _sample_pixels(size: int, samples: Path | None) -> torch.Tensor:
    """uint8 (N, 3, S, S): the sample images decoded as training decodes them, then synthesised ones
    (noise, ramps, a checkerboard, flat grey) so that a checkpoint without data is checked too."""
    decoded = [torch.from_numpy(decode_image(path, size).copy()) for path in _sample_files(samples, images=True)]
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    squares = ((torch.arange(size).view(-1, 1) // 4 + torch.arange(size) // 4) % 2 * 255).to(torch.uint8)
    made = [*torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=generator),
            ramp.view(1, 1, -1).expand(3, size, size), ramp.view(1, -1, 1).expand(3, size, size),
            squares.expand(3, size, size), torch.full((3, size, size), 128, dtype=torch.uint8)]
    return torch.stack(decoded + made)  # (N, 3, S, S)


def _sample_texts(samples: Path | None) -> list[str]:
    read = [path.read_text(encoding="utf-8", errors="replace") for path in _sample_files(samples, images=False)]
    return read + list(SAMPLE_TEXTS)


def _random_ids(vocabulary_size: int, lengths: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(B, max length) ids from the vocabulary (known and unknown), each row 0-padded after its length."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(UNK_ID, max(vocabulary_size, UNK_ID + 1), (len(lengths), max(lengths)), generator=generator)
    for row, length in enumerate(lengths):
        ids[row, length:] = PAD_ID
    return ids


def _text_batches(encoder: TextEncoder, texts: list[str], max_tokens: int) -> list[Batch]:
    encoded = encoder.encode(texts)  # (B, T)
    vocabulary = len(encoder.vocabulary)
    return [{"token_ids": encoded[:1]}, {"token_ids": encoded},
            {"token_ids": _random_ids(vocabulary, (40, 7, 1))},
            {"token_ids": _random_ids(vocabulary, (1,))},
            {"token_ids": _random_ids(vocabulary, (max_tokens + 8,), seed=1)}]  # longer than the model reads


def sample_batches(checkpoint: LoadedCheckpoint, samples: Path | None = None) -> list[Batch]:
    """Model inputs (keyword → tensor) of several batch sizes and lengths, made the way the service
    makes them from images and texts."""
    manifest, directory = checkpoint.manifest, checkpoint.directory
    if manifest.task == "image":
        preprocessing = ImagePreprocessing.from_manifest(manifest)
        images = preprocessing.normalize(_sample_pixels(preprocessing.size, samples))  # (N, 3, S, S)
        return [{"images": images[:1]}, {"images": images[1:4]}, {"images": images}]
    texts = _sample_texts(samples)
    if manifest.task == "text":
        encoder = load_text_encoder(directory, manifest)
        return _text_batches(encoder, texts, encoder.preprocessing.max_tokens)
    image_preprocessing, _ = fusion_preprocessing(manifest)
    pixels = list(_sample_pixels(image_preprocessing.size, samples))
    encoder = load_fusion_text_encoder(directory, manifest)
    rows = [row[row != PAD_ID] for row in encoder.encode(texts)]
    texts, token_ids = [t for t, r in zip(texts, rows, strict=True) if len(r)], [r for r in rows if len(r)]  # words left
    pieces = load_fusion_sentence_tokenizer(directory, manifest)
    sentence_ids = None if pieces is None else [torch.tensor(pieces.encode(text), dtype=torch.long) for text in texts]

    def collate(pairs: list[tuple[int | None, int | None]]) -> Batch:
        return collate_fusion_batch(
            [None if i is None else pixels[i] for i, _ in pairs], [None if t is None else token_ids[t] for _, t in pairs],
            image_preprocessing,
            sentence_ids=None if sentence_ids is None else [None if t is None else sentence_ids[t] for _, t in pairs])

    count = min(len(pixels), len(texts))
    return [collate([(0, 0)]),
            collate([(i, i) for i in range(count)]),
            collate([((i, i), (i, None), (None, i))[i % 3] for i in range(count)]),  # a side missing here and there
            collate([(i, None) for i in range(3)]), collate([(None, t) for t in range(3)])]


def calibrated_probabilities(model: nn.Module, batch: Batch, calibration: Calibration) -> torch.Tensor:
    """What the service answers for ``batch`` (its worker's formula, in float32): (B, classes)."""
    with torch.inference_mode():
        return calibration.probabilities(model(**batch))


# ---- writing and running the exported graph -----------------------------------------------------

@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' deprecation notices and progress chatter (the check after export is what counts)."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [one.level for one in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for one in loggers:
            one.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for one, level in zip(loggers, levels, strict=True):
                one.setLevel(level)


def _onnx_translations() -> dict[Callable[..., Any], Callable[..., Any]]:
    """ONNX for the aten ops of the n-gram bag that torch's exporter lacks or lowers badly.

    ``searchsorted`` and a stable sort have no ONNX lowering. ``repeat_interleave`` is lowered through
    a (total × N) comparison, which needs gigabytes for a long text. ``index_add`` becomes ScatterND
    with reduction="add", which ONNX Runtime's threads sum into one row at once (wrong totals where
    indices repeat, and they do: many features per text); ScatterElements sums in order."""
    from onnxscript import opset18

    op: Any = opset18  # the opset's stubs type each input by a union the dispatcher resolves at export

    def binary_search(sorted_sequence: Any, values: Any, steps: int, right: bool) -> Any:
        """For each value, the first index whose element is > it (right) or ≥ it: ``steps`` halvings,
        unrolled (steps ≥ the bit length of the sequence's length)."""
        length = op.Gather(op.Shape(sorted_sequence), op.Constant(value_int=0), axis=0)
        low = op.Mul(values, op.Constant(value_int=0))
        high = op.Add(low, length)
        last = op.Max(op.Sub(length, op.Constant(value_int=1)), op.Constant(value_int=0))
        one, two = op.Constant(value_int=1), op.Constant(value_int=2)
        for _ in range(steps):
            middle = op.Div(op.Add(low, high), two)
            element = op.Gather(sorted_sequence, op.Min(middle, last), axis=0)
            go_right = op.LessOrEqual(element, values) if right else op.Less(element, values)
            active = op.Less(low, high)
            low = op.Where(op.And(active, go_right), op.Add(middle, one), low)
            high = op.Where(op.And(active, op.Not(go_right)), middle, high)
        return low

    def searchsorted(sorted_sequence: Any, self: Any, out_int32: bool = False, right: bool = False,
                     side: str | None = None, sorter: Any = None) -> Any:
        if out_int32 or sorter is not None:
            raise ExportError("searchsorted with out_int32 or a sorter has no ONNX lowering here")
        length = sorted_sequence.shape[0]
        steps = max(length, 1).bit_length() if isinstance(length, int) else 63
        return binary_search(sorted_sequence, self, steps, right or side == "right")

    def sort_stable(self: Any, stable: bool | None = None, dim: int = -1, descending: bool = False) -> Any:
        # ONNX TopK breaks ties by the lower index: a stable sort when k is the whole axis
        count = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]), axis=0)
        return op.TopK(self, count, axis=dim, largest=1 if descending else 0, sorted=1)

    def repeat_interleave(repeats: Any, output_size: int | None = None) -> Any:
        # output position p belongs to the first i whose running total of repeats exceeds p
        ends = op.CumSum(repeats, op.Constant(value_int=0))
        positions = op.Range(op.Constant(value_int=0), op.ReduceSum(repeats, keepdims=0), op.Constant(value_int=1))
        return binary_search(ends, positions, 32, right=True)

    def index_add(self: Any, dim: int, index: Any, source: Any, alpha: float = 1) -> Any:
        if alpha != 1:
            source = op.Mul(source, op.CastLike(op.Constant(value_float=float(alpha)), source))
        shape = [1] * len(source.shape)
        shape[dim] = -1
        index = op.Expand(op.Reshape(index, op.Constant(value_ints=shape)), op.Shape(source))
        return op.ScatterElements(self, index, source, axis=dim, reduction="add")

    aten = torch.ops.aten
    return {aten.searchsorted.Tensor: searchsorted, aten.sort.stable: sort_stable,
            aten.repeat_interleave.Tensor: repeat_interleave, aten.index_add.default: index_add}


def _arguments(graph: ExportGraph, batch: Batch) -> tuple[torch.Tensor, ...]:
    return tuple(batch[spec.name] for spec in graph.inputs)


def write_onnx(graph: ExportGraph, example: Batch, path: Path) -> None:
    try:
        import onnxruntime  # noqa: F401  (checked before minutes of exporting)
        import onnxscript  # noqa: F401  (torch's exporter writes through it)
    except ModuleNotFoundError as error:
        raise ExportError(f"ONNX export needs {error.name}: pip install -e '.[train]'") from None
    axes: dict[str, Any] = {}
    dynamic_shapes = {spec.name: {axis: axes.setdefault(name, torch.export.Dim(name, min=1))
                                  for axis, name in enumerate(spec.shape) if isinstance(name, str)}
                      for spec in graph.inputs}
    with _quiet_exporters(), torch.no_grad():
        torch.onnx.export(graph.module, _arguments(graph, example), str(path), dynamo=True, verbose=False,
                          input_names=[spec.name for spec in graph.inputs], output_names=[OUTPUT],
                          opset_version=OPSET, dynamic_shapes=dynamic_shapes, external_data=False,
                          custom_translation_table=_onnx_translations())


def write_torchscript(graph: ExportGraph, example: Batch, path: Path) -> None:
    # A trace records the tensor operations of the example and keeps sizes symbolic; the check on
    # other batch sizes and lengths below catches a model whose trace would not generalise.
    with _quiet_exporters(), torch.no_grad():
        traced = torch.jit.trace(graph.module, _arguments(graph, example), check_trace=False)
    traced.save(str(path))


def onnx_runner(graph: ExportGraph, path: Path) -> Callable[[Batch], torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: torch.from_numpy(session.run([OUTPUT], {k: v.numpy() for k, v in batch.items()})[0])


def torchscript_runner(graph: ExportGraph, path: Path) -> Callable[[Batch], torch.Tensor]:
    with _quiet_exporters():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(batch: Batch) -> torch.Tensor:
        with torch.inference_mode():
            return module(*_arguments(graph, batch))  # type: ignore[no-any-return]

    return run


def _first_cause(error: BaseException) -> str:
    """The innermost cause of an exporter's error, in a line: what it could not follow."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    return f"{type(error).__name__}: {next((line for line in lines if line), '')}"[:500]


def check_export(run: Callable[[Batch], torch.Tensor], checkpoint: LoadedCheckpoint, batches: list[Batch]) -> float:
    """The largest |exported − PyTorch| over every calibrated probability of ``batches``; an
    ``ExportError`` beyond ``TOLERANCE`` (or for a shape mismatch, or a value that is not finite)."""
    worst = 0.0
    for batch in batches:
        expected = calibrated_probabilities(checkpoint.model, batch,
                                            Calibration.from_manifest(checkpoint.manifest.calibration))
        got = run(batch).float()
        shapes = {name: tuple(tensor.shape) for name, tensor in batch.items()}
        if got.shape != expected.shape:
            raise ExportError(f"the exported model answers shape {tuple(got.shape)} for inputs {shapes}; "
                              f"the PyTorch model {tuple(expected.shape)}")
        difference = (got - expected).abs().max().item() if torch.isfinite(got).all() else float("inf")
        if difference > TOLERANCE:
            raise ExportError(f"the exported model differs from the PyTorch model by {difference:.3g} (> {TOLERANCE:g}) "
                              f"on inputs {shapes}; nothing was written")
        worst = max(worst, difference)
    return worst


# ---- what is written beside the graph -----------------------------------------------------------

def client_steps(checkpoint: LoadedCheckpoint) -> list[str]:
    """What a client does to raw inputs before calling the graph (the service does the same)."""
    task = checkpoint.manifest.task
    if task == "image":
        return ["decode the image and convert it to RGB",
                "resize to size × size (preprocessing.resize, bilinear; the aspect ratio is not kept)",
                "as float32 (B, 3, size, size), channels first: (pixel - 255·mean) / (255·std) per channel "
                "(mean and std are on the 0–1 scale; models.preprocessing.ImagePreprocessing.normalize)"]
    if task == "text":
        return ["tokenise each text as models.text_encoding.TextEncoder does with this preprocessing and its "
                "vocabulary file (copied here): lower-case, spaCy's blank English tokenizer, ids from the vocabulary "
                "(unknown tokens 1)",
                "right-pad the id rows of a batch with 0 to the longest (int64 (B, T), T ≥ 1; an empty text is one 0)"]
    return ["see models.fusion.FUSION_INPUTS: images standardised as for an image model (zeros where a pair has "
            "none), token ids as for a text model (a row of 0s where a pair has no text), presence masks, and "
            "WordPiece ids for a model with a sentence encoder (preprocessing.sentence)"]


def describe(checkpoint: LoadedCheckpoint, graph: ExportGraph, fmt: str, model_path: Path, check: dict[str, Any],
             root: Path) -> dict[str, Any]:
    manifest = checkpoint.manifest
    calibration: dict[str, Any] = {"temperature": manifest.temperature, "folded_in": True,
                                   "output": "softmax(logits / temperature)"}
    if "top_label" in manifest.calibration:
        calibration["top_label"] = manifest.calibration["top_label"]
        calibration["output"] += ", then the top-label map (models/calibration.py)"
    if "score_power" in manifest.config:  # sign(s)·|s|^p inside the text model's logits
        calibration["score_power"] = manifest.config["score_power"]
    return {
        "format": "onnx" if fmt == "triton" else fmt, "file": model_path.relative_to(root).as_posix(),
        "bytes": model_path.stat().st_size, "sha256": sha256_file(model_path),
        "opset": OPSET if fmt != "torchscript" else None, "exporter": f"torch {torch.__version__}",
        "name": manifest.name, "version": manifest.version, "task": manifest.task,
        "architecture": manifest.architecture, "classes": list(manifest.classes),
        "inputs": [spec.describe() for spec in graph.inputs], "outputs": [graph.output.describe()],
        "preprocessing": manifest.preprocessing, "client_steps": client_steps(checkpoint), "calibration": calibration,
        "lineage": {"checkpoint": manifest.name, "version": manifest.version, "weights_sha256": manifest.weights_sha256,
                    "created_at": manifest.created_at, "code_version": manifest.code_version,
                    "data_fingerprint": manifest.data_fingerprint, "parent": manifest.parent},
        "check": check, "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


TRITON_TYPES = {torch.float32: "TYPE_FP32", torch.int64: "TYPE_INT64", torch.bool: "TYPE_BOOL"}


def triton_config(name: str, graph: ExportGraph, max_batch_size: int, max_queue_delay_us: int) -> str:
    """config.pbtxt for Triton's ONNX Runtime backend: the batch axis is Triton's, so dims leave it out."""

    def tensor(spec: TensorSpec, extra: str = "") -> str:
        dims = ", ".join("-1" if isinstance(d, str) else str(d) for d in spec.shape[1:])
        return (f"  {{\n    name: {json.dumps(spec.name)}\n    data_type: {TRITON_TYPES[spec.dtype]}\n"
                f"    dims: [ {dims} ]\n{extra}  }}")

    inputs = ",\n".join(tensor(spec) for spec in graph.inputs)
    output = tensor(graph.output, f"    label_filename: {json.dumps(LABELS_FILE)}\n")
    return (f"name: {json.dumps(name)}\nplatform: \"onnxruntime_onnx\"\nmax_batch_size: {max_batch_size}\n"
            f"input [\n{inputs}\n]\noutput [\n{output}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n")


# ---- the command ----------------------------------------------------------------------------------

def _target(checkpoint_dir: Path, name: str, fmt: str, output: Path | None) -> Path:
    """Where the export goes (a Triton repository gets one model folder), refused where it would
    replace or land in the checkpoint, or replace anything that is not an earlier export."""
    root = output if output is not None else checkpoint_dir.parent / f"{checkpoint_dir.name}-{fmt}"
    target = root / name if fmt == "triton" else root
    source, resolved = checkpoint_dir.resolve(), target.resolve()
    if resolved == source or resolved.is_relative_to(source) or source.is_relative_to(resolved):
        raise ExportError(f"--output {root} would write into or over the checkpoint {checkpoint_dir}; choose another")
    if target.exists() and (not target.is_dir() or (any(target.iterdir())
                                                     and not (target / DESCRIPTION_FILE).is_file())):
        raise ExportError(f"{target} exists and is not an earlier export (no {DESCRIPTION_FILE}); "
                          "choose another --output or remove it")
    return target


def export_checkpoint(checkpoint: str | Path, fmt: str = "onnx", output: str | Path | None = None,
                      samples: str | Path | None = None, max_batch_size: int = 32,
                      max_queue_delay_us: int = 5000) -> dict[str, Any]:
    """Export ``checkpoint`` as ``fmt``, checked against the PyTorch model, into ``output`` (default:
    a sibling folder ``<checkpoint>-<format>``); returns what was written and the check's result."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise ExportError(f"{directory}: not a checkpoint directory (model.safetensors and manifest.json)")
    if max_batch_size < 1:
        raise ExportError("--max-batch-size must be at least 1")
    loaded = load_checkpoint(directory)  # strict: hashes checked, manifest file names kept inside it
    manifest = loaded.manifest
    if fmt == "triton" and manifest.task != "image":
        raise ExportError(f"the Triton layout is for image models; {manifest.name!r} is a {manifest.task} model "
                          "(export it with --format onnx and batch its variable-length inputs yourself)")
    target = _target(directory, manifest.name, fmt, None if output is None else Path(output))
    graph = build_graph(loaded)
    batches = sample_batches(loaded, None if samples is None else Path(samples))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        started = time.perf_counter()
        model_path = _write_graph(graph, batches, fmt, staging, manifest.architecture)
        export_seconds = time.perf_counter() - started
        started = time.perf_counter()
        worst = check_export((torchscript_runner if fmt == "torchscript" else onnx_runner)(graph, model_path),
                             loaded, batches)
        check = {"max_abs_diff": worst, "tolerance": TOLERANCE, "runtime": _runtime(fmt),
                 "seconds": round(time.perf_counter() - started, 2), "samples": None if samples is None else str(samples),
                 "inputs": [{name: list(tensor.shape) for name, tensor in batch.items()} for batch in batches]}
        for name in manifest.files:  # a vocabulary the preprocessing names, verified against its sha256
            (staging / name).write_bytes(read_extra_file(directory, manifest, name))
        if fmt == "triton":
            (staging / "config.pbtxt").write_text(triton_config(manifest.name, graph, max_batch_size, max_queue_delay_us))
            (staging / LABELS_FILE).write_text("".join(f"{label}\n" for label in manifest.classes))
        description = describe(loaded, graph, fmt, model_path, check, staging)
        (staging / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
        for path in [staging, *staging.rglob("*")]:  # mkdtemp made it 0700: readable by a server's user too
            path.chmod(0o755 if path.is_dir() else 0o644)
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s as %s to %s in %.1f s (%d bytes); max |Δp| %.2e over %d batches",
                manifest.name, fmt, target, export_seconds, description["bytes"], worst, len(batches))
    return {"format": fmt, "output": str(target), "file": str(target / description["file"]),
            "bytes": description["bytes"], "export_seconds": round(export_seconds, 2), "max_abs_diff": worst,
            "tolerance": TOLERANCE, "description": description}


def _write_graph(graph: ExportGraph, batches: list[Batch], fmt: str, staging: Path, architecture: str) -> Path:
    """The graph written into ``staging`` (a Triton version folder: ``1/``); an exporter's failure as an
    ``ExportError`` naming its innermost cause."""
    path = staging / ("1" if fmt == "triton" else "") / MODEL_FILES[fmt]
    path.parent.mkdir(exist_ok=True)
    example = max(batches, key=lambda batch: tuple(t.shape[0] for t in batch.values()))  # ≥ 2 rows: batch stays dynamic
    try:
        (write_torchscript if fmt == "torchscript" else write_onnx)(graph, example, path)
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"{architecture!r} does not export to {fmt}: {_first_cause(error)}") from error
    return path


def _runtime(fmt: str) -> str:
    if fmt == "torchscript":
        return f"torch.jit (torch {torch.__version__})"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def _export_command(args: argparse.Namespace) -> dict[str, Any]:
    return export_checkpoint(args.checkpoint, args.format, args.output, args.samples, args.max_batch_size)


def add_commands(commands: Any) -> None:
    export = commands.add_parser("export", help="export a checkpoint to ONNX, TorchScript or a Triton model repository")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--format", choices=FORMATS, default="onnx",
                        help="onnx (default), torchscript, or triton (a model repository holding the ONNX graph)")
    export.add_argument("--output", type=Path,
                        help="folder to write (triton: the model repository); default: CHECKPOINT-FORMAT beside it")
    export.add_argument("--samples", type=Path,
                        help="images and/or text files to check the export on, besides synthesised ones")
    export.add_argument("--max-batch-size", type=int, default=32, help="triton: max_batch_size in config.pbtxt")
    export.set_defaults(handler=_export_command)
