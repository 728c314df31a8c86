"""Helpers for the service tests: a real uvicorn subprocess on a free port, tiny checkpoints, image encoding."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.tasks import TaskRunner
from models import build_model
from models.checkpoint import new_manifest, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-1"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_PREPROCESSING = {"kind": "image", "size": 32, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26],
                       "color": "RGB", "resize": "bilinear"}


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def save_image_model(directory: Path, name: str, architecture: str, config: dict[str, object],
                      temperature: float = 1.0) -> None:
    """A tiny untrained image checkpoint; ``architecture="probe"`` saves a LeNet for probe_server.py."""
    model = build_model("lenet" if architecture == "probe" else architecture,
                        {k: v for k, v in config.items() if k in ("num_classes", "widths")})
    manifest = new_manifest(name, "image", architecture, config, classes=CLASSES, preprocessing=IMAGE_PREPROCESSING,
                            calibration={"temperature": temperature}, metrics={"val_accuracy": 0.1})
    save_checkpoint(directory / name, model, manifest)


FUSION_CLASSES = ["negative", "neutral", "positive"]
FUSION_CORPUS = ["Best day ever at the beach", "ugh stuck in traffic again", "the meeting is at noon",
                 "I love this sunset", "worst service ever"]


def tiny_wordpiece_vocabulary(texts: list[str]) -> list[str]:
    """BERT's special tokens, the lower-cased words of ``texts``, and every letter as a word start and continuation."""
    import string

    words = sorted({word for text in texts for word in text.lower().split()})
    letters = list(string.ascii_lowercase)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *(f"##{c}" for c in letters),
            *string.punctuation]


def save_fusion_model(directory: Path, name: str, architecture: str, temperature: float = 1.0,
                      sentence: bool = False) -> None:
    """A tiny untrained multimodal checkpoint (``fusion_late`` or ``fusion_joint``) over 32×32 images;
    ``sentence``: the late model with a tiny sentence encoder and its WordPiece vocabulary.

    Weights are random (the text bag's too, which starts at zero) so both sides move the answer.
    """
    import torch

    import models.fusion  # noqa: F401  (registers the fusion architectures)
    from models.text_encoding import TextPreprocessing, Vocabulary, tokenize

    text = TextPreprocessing(max_tokens=64)
    vocabulary = Vocabulary.build(tokenize(FUSION_CORPUS, text), min_freq=1)
    config: dict[str, object]
    pieces = tiny_wordpiece_vocabulary(FUSION_CORPUS)
    if architecture == "fusion_late":
        config = {"num_classes": 3, "image": {"widths": [8, 16, 16]}, "hidden": 8,
                  "text": {"vocab_size": len(vocabulary), "num_classes": 3, "max_tokens": 64}}
        if sentence:
            config["sentence"] = {"vocab_size": len(pieces), "hidden": 8, "layers": 1, "heads": 2, "intermediate": 16,
                                  "max_positions": 64, "max_tokens": 64}
    else:
        config = {"num_classes": 3, "modalities": ["image", "text"], "dim": 16, "depth": 1, "heads": 2,
                  "image_size": 32, "patch_size": 8, "stem_width": 8, "vocab_size": len(vocabulary),
                  "max_text_tokens": 64}
    torch.manual_seed(0)
    model = build_model(architecture, config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not bool(parameter.any()):
                parameter.normal_(0, 1)
    preprocessing: dict[str, object] = {"kind": "multimodal", "image": IMAGE_PREPROCESSING, "text": text.to_dict()}
    extra_files = {text.vocab_file: vocabulary.to_json_bytes()}
    if sentence:
        preprocessing["sentence"] = {"kind": "wordpiece", "vocab_file": "sentence_vocab.json", "max_tokens": 64}
        extra_files["sentence_vocab.json"] = json.dumps(pieces).encode()
    manifest = new_manifest(name, "multimodal", architecture, config, classes=FUSION_CLASSES,
                            preprocessing=preprocessing, calibration={"temperature": temperature})
    save_checkpoint(directory / name, model, manifest, extra_files=extra_files)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A uvicorn subprocess serving ``app.main:app`` on a free port; ``shipped``: launched as the
    service ships (``python -m app.serve``, with its connection limits)."""

    def __init__(self, log_path: Path, env: dict[str, str], probe: bool = False, shipped: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        entry = [str(Path(__file__).parent / "probe_server.py")] if probe else ["-m", "uvicorn"]
        command = [sys.executable, *entry, "app.main:app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--timeout-graceful-shutdown", "10", "--no-access-log"]
        if shipped:
            command = [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(self.port),
                       "--no-access-log"]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_alive(self, timeout: float = 240) -> None:
        self._wait("/healthz", timeout)

    def wait_ready(self, timeout: float = 240) -> None:
        self._wait("/readyz", timeout)

    def _wait(self, path: str, timeout: float) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{path} not 200 after {timeout} s:\n{self.logs()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@contextlib.contextmanager
def serving(log_path: Path, env: dict[str, str], probe: bool = False, shipped: bool = False) -> Iterator[Server]:
    """A ready ``Server`` for the ``with`` block, stopped after it (a module or session fixture's body)."""
    server = Server(log_path, env, probe=probe, shipped=shipped)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample of the server's /metrics (0 when absent)."""
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


def wait_for_metric(url: str, name: str, at_least: float, labels: dict[str, str] | None = None,
                    timeout: float = 60) -> None:
    until = time.monotonic() + timeout
    while metric(url, name, labels) < at_least:
        if time.monotonic() > until:
            raise TimeoutError(f"{name}{labels or ''} stayed below {at_least}")
        time.sleep(0.02)


class StubRunner(TaskRunner):
    """A runner over plain tensors for in-process worker tests: no checkpoint, payloads stacked as ``x``."""

    task = "image"

    def __init__(self) -> None:
        pass

    def prepare(self, inputs: Any, names: Any) -> list[Any]:
        return list(inputs)

    def collate(self, payloads: Any) -> dict[str, torch.Tensor]:
        return {"x": torch.stack(list(payloads))}

    def warmup_payload(self) -> Any:
        return torch.zeros(2)
