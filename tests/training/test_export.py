"""``python -m training export``: ONNX, TorchScript and Triton exports equal the PyTorch model's
calibrated probabilities, describe themselves, and refuse what they cannot do with a clear error."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    new_manifest,
    read_manifest,
    save_checkpoint,
    sha256_file,
)
from models.preprocessing import ImagePreprocessing
from models.registry import build_model
from models.text_encoding import TextPreprocessing, Vocabulary, load_text_encoder, tokenize
from training import export
from training.cli import main
from training.image.data import decode_image

onnxruntime = pytest.importorskip("onnxruntime", reason="pip install -e '.[train]'")
pytest.importorskip("onnxscript", reason="pip install -e '.[train]'")

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_IMAGE = ROOT / "checkpoints" / "cifar10-fastconv"


def _calibrated(checkpoint_dir: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The service's answer, computed here independently: softmax(logits / T) in float32."""
    loaded = load_checkpoint(checkpoint_dir)
    with torch.inference_mode():
        return torch.softmax(loaded.model(**batch).float() / loaded.manifest.temperature, dim=-1).numpy()


def _run(description_dir: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The exported model (ONNX Runtime or TorchScript, as its model.json says) on ``batch``."""
    description = json.loads((description_dir / export.DESCRIPTION_FILE).read_text())
    path = description_dir / description["file"]
    if description["format"] == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(output_names=["probabilities"], input_feed={k: v.numpy() for k, v in batch.items()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, and what the export was asked for
        module = torch.jit.load(str(path))
    with torch.inference_mode():
        return module(*(batch[spec["name"]] for spec in description["inputs"])).numpy()


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random fastconv with both test-time augmentations (flips, reflect-padded shifts)."""
    torch.manual_seed(3)
    model = build_model("fastconv", {"num_classes": 3, "widths": [8, 16, 16], "tta_translate": True})
    model.init_whitening(torch.randn(32, 3, 16, 16))  # type: ignore[operator]
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
    manifest = new_manifest("tiny-image", "image", "fastconv", model.config, classes=["cat", "dog", "owl"],
                            preprocessing=ImagePreprocessing(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)).to_dict(),
                            calibration={"temperature": 0.7})
    return save_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-image", model, manifest)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ngram_bag (bigrams, character n-grams, a score power) over the built-in sample texts."""
    from training.fusion.text import BagOptions, build_bag

    preprocessing = TextPreprocessing(max_tokens=64)
    token_lists = tokenize(list(export.SAMPLE_TEXTS) * 2, preprocessing)
    vocabulary = Vocabulary.build(token_lists, min_freq=1)
    torch.manual_seed(4)
    bag = build_bag([vocabulary.lookup(tokens) for tokens in token_lists], vocabulary, 3,
                    BagOptions(bigram_min_df=1, char_min_df=1, max_tokens=64))
    with torch.no_grad():
        bag.weight.normal_()
        bag.bias.normal_()
    bag.config.score_power = 1.5
    assert bag.config.num_bigrams > 0 and bag.config.num_char_ngrams > 0
    manifest = new_manifest("tiny-text", "text", "ngram_bag", bag.config, classes=["x", "y", "z"],
                            preprocessing=preprocessing.to_dict(), calibration={"temperature": 0.4})
    return save_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-text", bag, manifest,
                           extra_files={"vocab.json": vocabulary.to_json_bytes()})


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_bundled_image_checkpoint_exports_equal_to_pytorch_on_real_images(fmt: str, cifar_subset: Path,
                                                                          tmp_path: Path) -> None:
    samples = shutil.copytree(cifar_subset / "cat", tmp_path / ".cache" / "cat")  # a hidden folder above is fine
    result = export.export_checkpoint(BUNDLED_IMAGE, fmt, tmp_path / "out", samples=samples)
    assert result["max_abs_diff"] <= export.TOLERANCE
    check = result["description"]["check"]
    assert check["samples"] == str(samples)
    assert max(batch["images"][0] for batch in check["inputs"]) > export.MAX_SAMPLES  # real JPEGs, then synthesised
    # again, independently: real images of every class through the project's own preprocessing
    preprocessing = ImagePreprocessing.from_manifest(read_manifest(BUNDLED_IMAGE))
    files = [sorted(folder.iterdir())[0] for folder in sorted(cifar_subset.iterdir())]
    pixels = torch.stack([torch.from_numpy(decode_image(path, preprocessing.size).copy()) for path in files])
    batch = {"images": preprocessing.normalize(pixels)}
    got, expected = _run(tmp_path / "out", batch), _calibrated(BUNDLED_IMAGE, batch)
    assert got.shape == (10, 10)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_tiny_image_export_has_a_dynamic_batch_and_describes_itself(fmt: str, tiny_image: Path, tmp_path: Path) -> None:
    result = export.export_checkpoint(tiny_image, fmt, tmp_path / "out")
    manifest = read_manifest(tiny_image)
    description = json.loads((tmp_path / "out" / "model.json").read_text())
    model_file = tmp_path / "out" / export.MODEL_FILES[fmt]
    assert description["file"] == model_file.name and description["format"] == fmt
    assert description["sha256"] == sha256_file(model_file) and description["bytes"] == model_file.stat().st_size
    assert description["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    assert description["outputs"] == [{"name": "probabilities", "dtype": "float32", "shape": ["batch", 3]}]
    assert description["classes"] == manifest.classes and description["preprocessing"] == manifest.preprocessing
    assert description["calibration"]["temperature"] == pytest.approx(0.7) and description["calibration"]["folded_in"]
    assert description["lineage"]["checkpoint"] == "tiny-image"
    assert description["lineage"]["weights_sha256"] == manifest.weights_sha256
    assert description["check"]["max_abs_diff"] == result["max_abs_diff"] <= export.TOLERANCE
    for size in (1, 2, 7):  # batch sizes the export never saw
        batch = {"images": torch.randn(size, 3, 16, 16, generator=torch.Generator().manual_seed(size))}
        got = _run(tmp_path / "out", batch)
        assert got.shape == (size, 3)
        assert np.abs(got - _calibrated(tiny_image, batch)).max() <= 1e-4
        assert np.allclose(got.sum(axis=1), 1, atol=1e-5)
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        graph = onnx.load(str(model_file), load_external_data=False).graph
        dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        assert [i.name for i in graph.input] == ["images"] and dims == ["batch", 3, 16, 16]
        assert [o.name for o in graph.output] == ["probabilities"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_text_export_equals_pytorch_on_tokenised_texts_of_any_length(fmt: str, tiny_text: Path, tmp_path: Path) -> None:
    result = export.export_checkpoint(tiny_text, fmt, tmp_path / "out")
    assert result["max_abs_diff"] <= export.TOLERANCE
    description = result["description"]
    assert description["inputs"] == [{"name": "token_ids", "dtype": "int64", "shape": ["batch", "tokens"]}]
    assert description["calibration"]["score_power"] == 1.5
    assert (tmp_path / "out" / "vocab.json").read_bytes() == (tiny_text / "vocab.json").read_bytes()
    loaded = load_checkpoint(tiny_text)
    encoder = load_text_encoder(tiny_text, loaded.manifest)
    texts = ["the space shuttle launch", "goalie goalie goalie stopped the shots shots", "", "unseen words only here"]
    for token_ids in (encoder.encode(texts), encoder.encode(texts[:1]), torch.zeros(2, 1, dtype=torch.long)):
        batch = {"token_ids": token_ids}
        assert np.abs(_run(tmp_path / "out", batch) - _calibrated(tiny_text, batch)).max() <= 1e-4


def _pbtxt(text: str) -> dict[str, Any]:
    """Protobuf text format → nested dicts (repeated fields as lists): enough to read a config.pbtxt."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]|[^\s\[\]{}:,"]+', text)
    position = 0

    def value() -> Any:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "{":
            return message("}")
        if token == "[":
            items = []
            while tokens[position] != "]":
                items.append(value())
                position += tokens[position] == ","
            position += 1
            return items
        return json.loads(token) if token.startswith('"') else int(token) if token.lstrip("-").isdigit() else token

    def message(end: str | None) -> dict[str, Any]:
        nonlocal position
        fields: dict[str, Any] = {}
        while position < len(tokens) and tokens[position] != end:
            name = tokens[position]
            position += 1 + (tokens[position + 1] == ":")
            fields[name] = value()
        position += 1
        return fields

    return message(None)


def test_triton_layout_is_a_model_repository_that_matches_the_onnx_graph(tiny_image: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    repository = tmp_path / "repository"
    assert main(["export", str(tiny_image), "--format", "triton", "--output", str(repository),
                 "--max-batch-size", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] <= export.TOLERANCE
    folder = repository / "tiny-image"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt", "model.json"]
    config = _pbtxt((folder / "config.pbtxt").read_text())
    assert config["name"] == "tiny-image" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 16 and "max_queue_delay_microseconds" in config["dynamic_batching"]
    assert config["input"] == [{"name": "images", "data_type": "TYPE_FP32", "dims": [3, 16, 16]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [3],
                                 "label_filename": "labels.txt"}]
    assert (folder / "labels.txt").read_text().splitlines() == read_manifest(tiny_image).classes
    session = onnxruntime.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    assert (graph_input.name, graph_input.type, graph_input.shape) == ("images", "tensor(float)", ["batch", 3, 16, 16])
    assert (graph_output.name, graph_output.shape) == ("probabilities", ["batch", 3])
    # and with Triton's own ModelConfig message, which refuses unknown fields and wrong types
    model_config = _triton_model_config()
    parsed = _text_format().Parse((folder / "config.pbtxt").read_text(), model_config.ModelConfig())
    assert parsed.platform == "onnxruntime_onnx" and parsed.max_batch_size == 16
    assert parsed.input[0].data_type == model_config.TYPE_FP32 and list(parsed.input[0].dims) == [3, 16, 16]
    assert parsed.output[0].label_filename == "labels.txt" and parsed.dynamic_batching.max_queue_delay_microseconds > 0


def _text_format() -> Any:
    from google.protobuf import text_format

    return text_format


def _triton_model_config() -> Any:
    """Triton's model_config_pb2 (shipped in tritonclient, the dev extra's client of /v2), loaded by path:
    its package imports grpc, which tritonclient[http] leaves out."""
    tritonclient = pytest.importorskip("tritonclient", reason="pip install -e '.[dev]'")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        pytest.skip(f"{path} not found in this tritonclient")
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_layout_refuses_a_text_model(tiny_text: Path, tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="Triton layout is for image models"):
        export.export_checkpoint(tiny_text, "triton", tmp_path / "repository")
    assert not (tmp_path / "repository").exists()


def test_export_refuses_a_path_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty")]) == 2
    assert "no manifest.json (is this a checkpoint directory?)" in capsys.readouterr().err


def test_export_refuses_an_unknown_format(tiny_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tiny_image), "--format", "tflite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(export.ExportError, match="unknown export format 'tflite'; choose one of onnx, torchscript, triton"):
        export.export_checkpoint(tiny_image, "tflite")


def test_export_refuses_to_write_over_the_checkpoint_or_a_folder_it_did_not_write(tiny_image: Path,
                                                                                 tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="into or over the checkpoint"):
        export.export_checkpoint(tiny_image, "torchscript", tiny_image)
    with pytest.raises(export.ExportError, match="into or over the checkpoint"):
        export.export_checkpoint(tiny_image, "torchscript", tiny_image / "export")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(export.ExportError, match="is not an earlier export"):
        export.export_checkpoint(tiny_image, "torchscript", precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert load_checkpoint(tiny_image).manifest.name == "tiny-image"  # untouched


def test_an_export_that_differs_from_pytorch_fails_and_writes_nothing(tiny_image: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export.CalibratedImageModel, "calibrate",
                        lambda self, logits: torch.softmax(logits.float(), dim=-1))  # the temperature forgotten
    with pytest.raises(export.ExportError, match=r"differs from the PyTorch model by .* \(> 0.0001\)"):
        export.export_checkpoint(tiny_image, "torchscript", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the export nor its staging folder


def test_export_refuses_manifest_files_outside_the_checkpoint(tiny_text: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes((tiny_text / "vocab.json").read_bytes())
    escaping = shutil.copytree(tiny_text, tmp_path / "escaping")
    manifest = json.loads((escaping / "manifest.json").read_text())
    manifest["files"]["../outside.json"] = manifest["files"].pop("vocab.json")
    manifest["preprocessing"]["vocab_file"] = "../outside.json"
    (escaping / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="leads outside the checkpoint directory"):
        export.export_checkpoint(escaping, "torchscript", tmp_path / "a")
    linked = shutil.copytree(tiny_text, tmp_path / "linked")
    (linked / "vocab.json").unlink()
    (linked / "vocab.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a link that leads outside"):
        export.export_checkpoint(linked, "torchscript", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


_OPENED: list[str] = []
_RECORDING: list[bool] = []


def _record_opens(event: str, args: tuple[Any, ...]) -> None:
    if _RECORDING and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


def test_export_reads_no_file_outside_the_checkpoint_but_code(tiny_image: Path, tmp_path: Path) -> None:
    if _record_opens not in getattr(sys, "_export_test_hooks", []):
        sys.addaudithook(_record_opens)  # audit hooks stay for the process: recording is switched on here only
        sys._export_test_hooks = [_record_opens]  # type: ignore[attr-defined]
    _OPENED.clear()
    _RECORDING.append(True)
    try:
        export.export_checkpoint(tiny_image, "onnx", tmp_path / "out")
    finally:
        _RECORDING.clear()
    allowed = [str(tiny_image.resolve()), str(tmp_path.resolve()), sys.prefix, sys.base_prefix, "/proc", "/sys", "/dev"]
    code = [str(ROOT / "models"), str(ROOT / "training")]
    strays = [p for p in _OPENED if not p.startswith(tuple(allowed)) and not (p.startswith(tuple(code)) and p.endswith(".py"))
              and Path(p).exists()]
    assert _OPENED and strays == []


def test_a_fusion_model_with_data_dependent_branches_is_refused_clearly() -> None:
    model = build_model("fusion_joint", {"num_classes": 3, "dim": 16, "depth": 1, "heads": 2, "vocab_size": 10,
                                         "patch_size": 8, "stem_width": 8})
    manifest = new_manifest("joint", "multimodal", "fusion_joint", model.config, classes=["a", "b", "c"],
                            preprocessing={})
    with pytest.raises(export.ExportError, match="'fusion_joint' cannot be exported: its forward chooses"):
        export.build_graph(LoadedCheckpoint(model, manifest, Path("joint")))


def test_an_architecture_the_exporter_cannot_follow_fails_with_its_reason(tmp_path: Path) -> None:
    preprocessing = TextPreprocessing(max_tokens=16)
    vocabulary = Vocabulary.build(tokenize(list(export.SAMPLE_TEXTS), preprocessing), min_freq=1)
    model = build_model("bilstm", {"vocab_size": len(vocabulary), "num_classes": 2, "embedding_dim": 4, "hidden_size": 4})
    manifest = new_manifest("lstm", "text", "bilstm", model.config, classes=["a", "b"], preprocessing=preprocessing.to_dict())
    checkpoint = save_checkpoint(tmp_path / "lstm", model, manifest, extra_files={"vocab.json": vocabulary.to_json_bytes()})
    # packed sequences: torch.export cannot trace pack_padded_sequence's data-dependent sizes
    with pytest.raises(export.ExportError, match=r"^'bilstm' does not export to onnx: \w+Error: .+"):
        export.export_checkpoint(checkpoint, "onnx", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lstm"]
