"""Hostile input against a real uvicorn process: every request's work is bounded, slow work is isolated.

Each case checks its status and message, how long it took where the service must refuse quickly,
that ``/healthz`` kept answering, and that the service is ready and correct afterwards.
"""

from __future__ import annotations

import io
import random
import string
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from servicekit import Server, encode, metric, save_image_model, serving, wait_for_metric

TEXT = "The shuttle launch was delayed by the weather over the cape"


class HealthWatch:
    """Polls /healthz every 20 ms in a thread; ``worst`` is its slowest answer."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.failures = url, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(self.url + "/healthz").status_code == 200
                except httpx.TransportError:
                    ok = False
                self.worst = max(self.worst, time.perf_counter() - started)
                self.failures += not ok
                time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _start(tmp_path_factory: pytest.TempPathFactory, name: str, env: dict[str, str]) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp(name) / "server.log", env) as server:
        yield server


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image model and a bag-of-words text model that reads 4,096 tokens, as the bundled one does."""
    from models import build_model
    from models.checkpoint import new_manifest, save_checkpoint
    from models.text_encoding import TextPreprocessing, Vocabulary, tokenize

    directory = tmp_path_factory.mktemp("hostile-checkpoints")
    save_image_model(directory, "tiny-fastconv", "fastconv", {"num_classes": 10, "widths": [8, 16, 16]})
    preprocessing = TextPreprocessing(max_tokens=4096, header_fields=("subject",))
    corpus = [TEXT, "Which graphics card runs X11", "The goalie made saves", "☃ ☀ ★"]
    vocabulary = Vocabulary.build(tokenize(corpus, preprocessing), min_freq=1)
    model = build_model("ngram_bag", {"vocab_size": len(vocabulary), "num_classes": 3, "max_tokens": 4096})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 1)
    manifest = new_manifest("bag-text", "text", "ngram_bag", model.config, classes=["space", "graphics", "hockey"],
                            preprocessing=preprocessing.to_dict())
    save_checkpoint(directory / "bag-text", model, manifest, extra_files={"vocab.json": vocabulary.to_json_bytes()})
    return directory


@pytest.fixture(scope="module")
def server(hostile_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MODEL_DIR": str(hostile_dir), "TOKENIZER_PROCESSES": "1", "PRECISION": "fp32", "MAX_WAIT_MS": "5",
           "MAX_IMAGE_PIXELS": str(4096 * 4096), "MAX_REQUEST_PIXELS": str(40_000_000),
           "MAX_JSON_BYTES": str(8 * 1024 * 1024)}  # room for the long texts: their bodies are not the point here
    yield from _start(tmp_path_factory, "hostile", env)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def _classify_text(client: httpx.Client, texts: list[str]) -> httpx.Response:
    return client.post("/v1/text/classify", json={"texts": texts})


def _images(client: httpx.Client, blobs: list[bytes]) -> httpx.Response:
    return client.post("/v1/image/classify", files=[("files", (f"{i}.bin", b, "application/octet-stream"))
                                                    for i, b in enumerate(blobs)])


def _still_correct(client: httpx.Client) -> None:
    assert client.get("/readyz").status_code == 200
    first = _classify_text(client, [TEXT])
    assert first.status_code == 200, first.text
    image = encode(Image.new("RGB", (32, 32), (10, 200, 30)), "PNG")
    assert _images(client, [image]).status_code == 200
    assert _classify_text(client, [TEXT]).json()["predictions"] == first.json()["predictions"]


def rle8_bmp(width: int, height: int) -> bytes:
    """A small BMP whose header declares ``width``×``height`` RLE8 pixels (each row: end of line)."""
    pixels = b"\x00\x00" * 10_000 + b"\x00\x01"
    palette = b"\x00\x00\x00\x00" * 256
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width``×``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"\x00" * (width + 1) * 4, 9)  # a few rows; the rest is missing
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_rle_bmp_declaring_6000_by_6000_is_refused_at_once(server: Server, client: httpx.Client) -> None:
    with HealthWatch(server.url) as health:
        started = time.perf_counter()
        response = _images(client, [rle8_bmp(6000, 6000)] * 16)
        elapsed = time.perf_counter() - started
    assert response.status_code == 415
    assert "BMP with RLE compression is not accepted" in response.json()["detail"]
    assert elapsed < 2 and health.worst < 0.1 and health.failures == 0
    _still_correct(client)


def test_png_declaring_30000_by_30000_is_refused_from_its_header(server: Server, client: httpx.Client) -> None:
    started = time.perf_counter()
    response = _images(client, [png_declaring(30_000, 30_000)])
    assert response.status_code == 413
    assert "image is too large" in response.json()["detail"] and "16,777,216 pixels" in response.json()["detail"]
    assert time.perf_counter() - started < 2
    _still_correct(client)


def test_16_bit_png_is_scaled_to_8_bit(client: httpx.Client) -> None:
    wide = Image.fromarray(np.full((2048, 2048), 60_000, dtype=np.uint16))  # mode I;16
    narrow = Image.fromarray(np.full((2048, 2048), 60_000 >> 8, dtype=np.uint8))
    answers = [_images(client, [encode(image, "PNG")]) for image in (wide, narrow)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["predictions"] == answers[1].json()["predictions"]


def test_many_large_images_over_the_request_budget_are_refused_before_decoding(
        server: Server, client: httpx.Client) -> None:
    big = encode(Image.new("RGB", (4000, 4000), (90, 30, 200)), "PNG")  # 16 MP each, within MAX_IMAGE_PIXELS
    started = time.perf_counter()
    response = _images(client, [big] * 3)
    assert response.status_code == 413
    assert "the images of this request are too large together (48,000,000 pixels to decode)" in \
        response.json()["detail"] and "MAX_REQUEST_PIXELS" in response.json()["detail"]
    assert time.perf_counter() - started < 2
    assert _images(client, [big]).status_code == 200  # one is within the budget
    _still_correct(client)


def test_64_texts_of_19000_snowmen_are_answered_quickly(server: Server, client: httpx.Client) -> None:
    with HealthWatch(server.url) as health:
        started = time.perf_counter()
        response = _classify_text(client, ["☃" * 19_000] * 64)
        elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 64
    assert elapsed < 2 and health.worst < 0.1
    varied = ["".join(random.Random(i).choice("☃☀☁☂★☆♠♣♥♦") for _ in range(19_000)) for i in range(64)]
    started = time.perf_counter()
    assert _classify_text(client, varied).status_code == 200
    assert time.perf_counter() - started < 5  # a few thousand tokens each, like an honest long post
    _still_correct(client)


def test_a_60000_character_post_is_answered_as_its_first_part(client: httpx.Client) -> None:
    words = ["shuttle", "launch", "orbit", "graphics", "card", "goalie", "saves", "the", "a", "of", "weather", "delayed"]
    rng = random.Random(0)
    post = "Subject: launch\n\n" + " ".join(rng.choice(words) for _ in range(12_000))
    post = post[:60_000]
    assert len(post) == 60_000
    whole, first = _classify_text(client, [post]), _classify_text(client, [post[:20_000]])
    assert whole.status_code == 200, whole.text
    assert whole.json()["predictions"] == first.json()["predictions"]


def _many_words(count: int, seed: int) -> list[str]:
    """Long texts of distinct made-up words: thousands of tokens each that no cache knows (slow to tokenise)."""
    return [" ".join("".join(random.Random(seed * 100_000 + i * 3_000 + j).choices(string.ascii_lowercase, k=6))
                     for j in range(2_700)) for i in range(count)]


def _tokenizer_children(server: Server) -> list[int]:
    """The tokenizer processes: children of the fork server, itself a child of the service."""
    service = psutil.Process(server.process.pid)
    forkservers = [p for p in service.children() if "forkserver" in " ".join(p.cmdline())]
    return [child.pid for fork in forkservers for child in fork.children()]


def test_a_killed_tokenizer_child_is_replaced(server: Server, client: httpx.Client) -> None:
    assert _classify_text(client, [TEXT]).status_code == 200
    [child] = _tokenizer_children(server)
    psutil.Process(child).kill()
    with HealthWatch(server.url) as health:
        answers = [_classify_text(client, [TEXT, "goalie saves"]) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert health.worst < 0.1
    replaced = _tokenizer_children(server)
    assert len(replaced) == 1 and replaced != [child]
    _still_correct(client)


def test_a_client_that_goes_away_has_its_work_cancelled(server: Server, client: httpx.Client) -> None:
    texts = _many_words(64, 1)
    before = metric(server.url, "crossmodal_items_total", {"model": "bag-text", "outcome": "ok"})
    with pytest.raises(httpx.TimeoutException), httpx.Client(base_url=server.url, timeout=0.3) as impatient:
        impatient.post("/v1/text/classify", json={"texts": texts})
    time.sleep(5)  # the tokenizer finishes the batch meanwhile; its items must not be computed
    assert metric(server.url, "crossmodal_items_total", {"model": "bag-text", "outcome": "ok"}) == before
    _still_correct(client)


@pytest.fixture(scope="module")
def strict_server(hostile_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A short tokenizer deadline and a small admission limit."""
    env = {"MODEL_DIR": str(hostile_dir), "TOKENIZER_PROCESSES": "1", "PRECISION": "fp32", "TOKENIZER_TIMEOUT": "0.3",
           "MAX_QUEUE": "64", "MAX_ITEMS_PER_REQUEST": "64", "WARMUP": "false", "MAX_JSON_BYTES": str(8 * 1024 * 1024)}
    yield from _start(tmp_path_factory, "strict", env)


def test_texts_past_the_tokenizer_deadline_fail_alone(strict_server: Server) -> None:
    slow = _many_words(64, 2)
    with httpx.Client(base_url=strict_server.url, timeout=60) as client, HealthWatch(strict_server.url) as health:
        assert _classify_text(client, [TEXT]).status_code == 200  # the tokenizer process is up (it starts after ready)
        before = _tokenizer_children(strict_server)
        started = time.perf_counter()
        response = _classify_text(client, slow)
        elapsed = time.perf_counter() - started
        assert response.status_code == 422
        assert "the texts took too long to tokenise" in response.json()["detail"]
        assert elapsed < 2 and health.worst < 0.1
        wait_for_metric(strict_server.url, "crossmodal_tokenizer_restarts_total", 1)
        assert _classify_text(client, [TEXT]).status_code == 200
        assert _tokenizer_children(strict_server) != before
        assert client.get("/readyz").status_code == 200


def test_admission_counts_requests_until_answered(strict_server: Server) -> None:
    blocker = _many_words(64, 3)
    with httpx.Client(base_url=strict_server.url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        busy = pool.submit(_classify_text, client, blocker)  # 64 items admitted while they are tokenised
        wait_for_metric(strict_server.url, "crossmodal_http_requests_in_flight", 1)
        time.sleep(0.05)
        started = time.perf_counter()
        refused = _classify_text(client, [TEXT])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["detail"] == "the server is busy: 64 items are queued (MAX_QUEUE=64)"
        assert time.perf_counter() - started < 0.5
        assert busy.result().status_code in (200, 422)  # 422 if the tokenizer deadline caught it
        assert _classify_text(client, [TEXT]).status_code == 200


def _png(pixels: int) -> bytes:
    return encode(Image.new("RGB", (pixels, pixels), (1, 2, 3)), "PNG")


def test_image_formats_outside_the_allowlist_are_refused(client: httpx.Client) -> None:
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    response = _images(client, [tiff.getvalue()])
    assert response.status_code == 415 and "unsupported image format" in response.json()["detail"]
    assert _images(client, [encode(Image.new("RGB", (40, 30), (5, 5, 5)), "BMP")]).status_code == 200
