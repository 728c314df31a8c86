"""Fixtures for the service tests: tiny real checkpoints, real CIFAR-10 JPEGs, real uvicorn processes."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servicekit import API_KEY, ROOT, Server, save_image_model, serving

from models import build_model
from models.checkpoint import new_manifest, save_checkpoint

CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
TEXT_CLASSES = ["space", "graphics", "hockey"]


@pytest.fixture(scope="session")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Twelve real CIFAR-10 training JPEGs (32×32)."""
    if not CIFAR.is_file():
        pytest.skip(f"shared data missing: {CIFAR}")
    found: list[bytes] = []
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                handle = tar.extractfile(member)
                assert handle is not None
                found.append(handle.read())
                if len(found) == 12:
                    break
    return found


def _save_text_model(directory: Path) -> None:
    from models.text_encoding import TextPreprocessing, Vocabulary, tokenize

    preprocessing = TextPreprocessing(max_tokens=64)
    corpus = ["The shuttle launch was delayed", "Which graphics card runs X11", "The goalie made saves"]
    vocabulary = Vocabulary.build(tokenize(corpus, preprocessing), min_freq=1)
    config = {"num_classes": 3, "modalities": ["text"], "dim": 32, "depth": 1, "heads": 2,
              "vocab_size": len(vocabulary), "max_text_tokens": 64}
    model = build_model("trunk", config)
    manifest = new_manifest("tiny-text", "text", "trunk", model.config, classes=TEXT_CLASSES,
                            preprocessing=preprocessing.to_dict())
    save_checkpoint(directory / "tiny-text", model, manifest, extra_files={"vocab.json": vocabulary.to_json_bytes()})


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-fastconv (default image model by name), tiny-lenet (temperature 1.5), tiny-text."""
    directory = tmp_path_factory.mktemp("checkpoints")
    save_image_model(directory, "tiny-fastconv", "fastconv", {"num_classes": 10, "widths": [8, 16, 16]})
    save_image_model(directory, "tiny-lenet", "lenet", {"num_classes": 10}, temperature=1.5)
    _save_text_model(directory)
    (directory / ".hidden").mkdir()  # skipped: dot-directory
    (directory / "notes").mkdir()  # skipped: no manifest
    return directory


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints of the test-only ``probe`` architecture (see probe_server.py)."""
    directory = tmp_path_factory.mktemp("probes")
    save_image_model(directory, "probe", "probe", {"num_classes": 10, "sleep_s": 0.2})
    save_image_model(directory, "busy-probe", "probe", {"num_classes": 10, "sleep_s": 3.0})
    save_image_model(directory, "stuck-probe", "probe", {"num_classes": 10, "sleep_s": 7.0})
    save_image_model(directory, "oom-probe", "probe", {"num_classes": 10, "oom_above": 1})
    return directory


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[object]:
    """Factory: ``start_server(env, probe=False)`` → a started (not yet ready) ``Server``; stopped afterwards."""
    servers: list[Server] = []

    def start(env: dict[str, str], probe: bool = False) -> Server:
        server = Server(tmp_path / f"server-{len(servers)}.log", env, probe)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def main_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service over the tiny models, API keys on, small limits."""
    env = {"MODEL_DIR": str(model_dir), "API_KEYS": f"{API_KEY}, test-key-2", "MAX_UPLOAD_BYTES": "300000",
           "MAX_ITEMS_PER_REQUEST": "8", "MAX_TEXT_CHARS": "500", "MAX_IMAGE_PIXELS": "1000000",
           "MAX_BATCH_SIZE": "16", "MAX_WAIT_MS": "20", "TOKENIZER_PROCESSES": "1",
           "PRECISION": "fp32"}  # exact comparisons with the checkpoint; bf16 serving: test_precision.py
    with serving(tmp_path_factory.mktemp("main") / "server.log", env) as server:
        yield server


@pytest.fixture
def client(main_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=main_server.url, headers={"X-API-Key": API_KEY}, timeout=30) as session:
        yield session


@pytest.fixture(scope="session")
def probe_server(probe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service over the probe models, API keys off, a small queue and a short deadline."""
    env = {"MODEL_DIR": str(probe_dir), "MAX_BATCH_SIZE": "8", "MAX_WAIT_MS": "20", "MAX_QUEUE": "6",
           "REQUEST_TIMEOUT": "6", "DEFAULT_IMAGE_MODEL": "probe", "WARMUP": "false"}
    with serving(tmp_path_factory.mktemp("probe") / "server.log", env, probe=True) as server:
        yield server


@pytest.fixture
def probe(probe_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=probe_server.url, timeout=30) as session:
        yield session


@pytest.fixture(scope="session")
def bundled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service over the bundled checkpoints (``checkpoints/``: every shipped model), no API keys."""
    env = {"MODEL_DIR": str(ROOT / "checkpoints"), "DEVICE": "cpu", "PRECISION": "fp32", "TRACE_MODELS": "false",
           "WARMUP": "false", "TOKENIZER_PROCESSES": "0", "API_KEYS": ""}
    with serving(tmp_path_factory.mktemp("bundled") / "server.log", env) as server:
        yield server
