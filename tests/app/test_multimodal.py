"""POST /v1/multimodal/classify end to end through a real uvicorn process over tiny fusion checkpoints."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from servicekit import FUSION_CLASSES, IMAGE_PREPROCESSING, Server, encode, metric, save_fusion_model, save_image_model, serving

from models.checkpoint import load_checkpoint
from models.fusion import load_fusion_sentence_tokenizer, load_fusion_text_encoder

URL = "/v1/multimodal/classify"
Pair = tuple[bytes | None, str | None]


@pytest.fixture(scope="module")
def fusion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-fusion-late (the default, temperature 1.3), tiny-fusion-joint, a late model with a sentence
    encoder, and an image model."""
    directory = tmp_path_factory.mktemp("fusion")
    save_fusion_model(directory, "tiny-fusion-late", "fusion_late", temperature=1.3)
    save_fusion_model(directory, "tiny-fusion-sentence", "fusion_late", sentence=True)
    save_fusion_model(directory, "tiny-fusion-joint", "fusion_joint")
    save_image_model(directory, "tiny-lenet", "lenet", {"num_classes": 10})
    return directory


@pytest.fixture(scope="module")
def fusion_server(fusion_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MODEL_DIR": str(fusion_dir), "DEFAULT_MULTIMODAL_MODEL": "tiny-fusion-late", "MAX_UPLOAD_BYTES": "300000",
           "MAX_ITEMS_PER_REQUEST": "8", "MAX_TEXT_CHARS": "200", "MAX_IMAGE_PIXELS": "1000000",
           "MAX_BATCH_SIZE": "16", "MAX_WAIT_MS": "20"}
    with serving(tmp_path_factory.mktemp("fusion-server") / "server.log", env) as server:
        yield server


@pytest.fixture
def mm(fusion_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fusion_server.url, timeout=30) as session:
        yield session


def _form(pairs: list[Pair]) -> dict:
    """httpx arguments for ``pairs``, a missing side sent as an empty value in its place."""
    files = [("files", (f"image{i}.jpg", image or b"", "image/jpeg")) for i, (image, _) in enumerate(pairs)]
    return {"files": files, "data": {"texts": [text or "" for _, text in pairs]}}


def _expected(directory: Path, pair: Pair) -> list[float]:
    """The checkpoint called directly on one pair, as models.fusion.FUSION_INPUTS describes."""
    loaded = load_checkpoint(directory)
    image, text = pair
    images = torch.zeros(1, 3, 32, 32)
    if image is not None:
        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32)  # (32, 32, 3)
        mean = np.array(IMAGE_PREPROCESSING["mean"]) * 255
        std = np.array(IMAGE_PREPROCESSING["std"]) * 255
        images = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1)).float()[None]  # (1, 3, 32, 32)
    encoder = load_fusion_text_encoder(directory, loaded.manifest)
    token_ids = encoder.encode([text]) if text is not None else torch.zeros(1, 1, dtype=torch.long)
    inputs = {"images": images, "token_ids": token_ids, "image_mask": torch.tensor([image is not None]),
              "text_mask": torch.tensor([text is not None])}
    pieces = load_fusion_sentence_tokenizer(directory, loaded.manifest)
    if pieces is not None:  # the sentence encoder's own WordPiece ids: [CLS] … [SEP]
        inputs["sentence_ids"] = torch.tensor([pieces.encode(text) if text is not None else [0]])
    with torch.no_grad():
        logits = loaded.model(**inputs)
    return torch.softmax(logits / loaded.manifest.temperature, dim=-1)[0].tolist()


def _check(prediction: dict, expected: list[float]) -> None:
    probabilities = prediction["probabilities"]
    assert list(probabilities) == FUSION_CLASSES
    assert list(probabilities.values()) == pytest.approx(expected, abs=1e-5)
    assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-5)
    assert prediction["label"] == max(probabilities, key=probabilities.get)


@pytest.mark.parametrize("name", ["tiny-fusion-late", "tiny-fusion-joint", "tiny-fusion-sentence"])
def test_classify_pairs_matches_the_checkpoint_in_order(mm: httpx.Client, fusion_dir: Path, jpegs: list[bytes],
                                                        name: str) -> None:
    pairs: list[Pair] = [(jpegs[0], "Best day ever at the beach"), (None, "ugh stuck in traffic again"),
                         (jpegs[1], None), (jpegs[2], "worst service ever")]
    response = mm.post(URL, params={"model": name, "top_k": 2}, **_form(pairs))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": name, "version": "1", "task": "multimodal"}
    assert body["request_id"] == response.headers["x-request-id"]
    assert len(body["predictions"]) == len(pairs)
    for pair, prediction in zip(pairs, body["predictions"], strict=True):
        _check(prediction, _expected(fusion_dir / name, pair))
        assert len(prediction["top_k"]) == 2


def test_text_only_and_image_only_requests(mm: httpx.Client, fusion_dir: Path, jpegs: list[bytes]) -> None:
    texts = ["I love this sunset", "the meeting is at noon", "worst service ever"]
    response = mm.post(URL, data={"texts": texts})
    assert response.status_code == 200, response.text
    assert response.json()["model"]["name"] == "tiny-fusion-late"  # the default
    for text, prediction in zip(texts, response.json()["predictions"], strict=True):
        _check(prediction, _expected(fusion_dir / "tiny-fusion-late", (None, text)))
    response = mm.post(URL, files=[("files", (f"{i}.jpg", jpegs[i], "image/jpeg")) for i in (3, 4)])
    assert response.status_code == 200, response.text
    for i, prediction in zip((3, 4), response.json()["predictions"], strict=True):
        _check(prediction, _expected(fusion_dir / "tiny-fusion-late", (jpegs[i], None)))


def test_every_kind_of_empty_part_means_no_image(mm: httpx.Client, fusion_dir: Path, jpegs: list[bytes]) -> None:
    boundary = "mmboundary"
    parts = [
        b'Content-Disposition: form-data; name="files"; filename=""\r\nContent-Type: application/octet-stream\r\n\r\n',
        b'Content-Disposition: form-data; name="files"; filename="empty.jpg"\r\nContent-Type: image/jpeg\r\n\r\n',
        b'Content-Disposition: form-data; name="files"\r\n\r\n',  # a plain empty field (curl -F files=)
        b'Content-Disposition: form-data; name="files"; filename="cat.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        + jpegs[0],
    ] + [f'Content-Disposition: form-data; name="texts"\r\n\r\n{text}'.encode()
         for text in ("I love this sunset", "I love this sunset", "I love this sunset", " \t")]
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()
    response = mm.post(URL, content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    text_only = _expected(fusion_dir / "tiny-fusion-late", (None, "I love this sunset"))
    for prediction in predictions[:3]:
        _check(prediction, text_only)
    _check(predictions[3], _expected(fusion_dir / "tiny-fusion-late", (jpegs[0], None)))  # whitespace: no text


def test_a_request_is_one_batch_through_the_worker(mm: httpx.Client, fusion_server: Server, jpegs: list[bytes]) -> None:
    labels = {"model": "tiny-fusion-late"}
    batches = metric(fusion_server.url, "crossmodal_batch_size_count", labels)
    items = metric(fusion_server.url, "crossmodal_batch_size_sum", labels)
    pairs: list[Pair] = [(jpegs[i], f"post number {i}") for i in range(5)]
    assert mm.post(URL, **_form(pairs)).status_code == 200
    assert metric(fusion_server.url, "crossmodal_batch_size_sum", labels) - items == 5
    assert metric(fusion_server.url, "crossmodal_batch_size_count", labels) - batches == 1


def _image_files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"image{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


@pytest.mark.parametrize(("request_args", "message"), [
    ({"data": {"texts": ["a", "b", "c"]}, "files": _image_files([b"x", b"y"])},
     "2 images ('files' parts) but 3 texts ('texts' fields): pairs go by order, so send one of each per pair; mark a "
     "pair's missing side with an empty value (an empty 'texts' field, or an empty 'files' part)"),
    ({}, "no inputs in the request: send a multipart/form-data body with images in 'files' and/or texts in 'texts' "
         "(repeated fields, paired by order)"),
    ({"data": {"other": "x"}}, "no inputs in the request: send a multipart/form-data body with images in 'files' "
                               "and/or texts in 'texts' (repeated fields, paired by order)"),
    ({"data": {"texts": ["fine", ""]}, "files": _image_files([b"", b""])},
     "pair 1 has neither an image nor a text: send at least one side (an empty 'texts' field and an empty 'files' "
     "part leave nothing to classify)"),
    ({"data": {"texts": ["  "]}}, "pair 0 has neither an image nor a text: send at least one side (an empty 'texts' "
                                  "field and an empty 'files' part leave nothing to classify)"),
    ({"data": {"texts": ["a"] * 9}}, "too many pairs: 9 (at most 8 per request, MAX_ITEMS_PER_REQUEST)"),
    ({"data": {"texts": ["ok", "x" * 201]}},
     "pair 1: the text has 201 characters; at most 200 are accepted (MAX_TEXT_CHARS)"),
    ({"data": {"files": "cat.jpg", "texts": "a cat"}},
     "pair 0: the 'files' part is a plain form field, not a file: upload the image as a file (curl: -F "
     "files=@photo.jpg), or leave the part empty for no image"),
])
def test_classify_pairs_rejects_invalid_requests(mm: httpx.Client, request_args: dict, message: str) -> None:
    response = mm.post(URL, **request_args)
    assert response.status_code == 422
    assert response.json()["detail"] == message


@pytest.mark.parametrize(("image", "status", "message"), [
    (b"hello, this is text", 415, "pair 1 (image1.jpg): unsupported image format: send JPEG, PNG, WebP, BMP or GIF"),
    (b"\xff\xd8\xff\xe0" + bytes(50), 400, "pair 1 (image1.jpg): cannot decode the JPEG image (truncated or corrupt?)"),
    (encode(Image.new("L", (4000, 4000)), "PNG"), 413, "pair 1 (image1.jpg): image is too large"),  # a bomb
])
def test_classify_pairs_rejects_bad_images(mm: httpx.Client, jpegs: list[bytes], image: bytes, status: int,
                                           message: str) -> None:
    response = mm.post(URL, **_form([(jpegs[0], "fine"), (image, "also fine")]))
    assert response.status_code == status
    assert response.json()["detail"].startswith(message)
    if status == 413:
        assert "at most 1,000,000 pixels are accepted (decompression-bomb guard" in response.json()["detail"]
    assert mm.post(URL, **_form([(jpegs[0], "still serving")])).status_code == 200


def test_classify_pairs_refuses_body_over_limit(mm: httpx.Client) -> None:
    response = mm.post(URL, **_form([(bytes(400_000), "big")]))
    assert response.status_code == 413
    assert response.json()["detail"] == "request body is larger than the limit of 300,000 bytes (MAX_UPLOAD_BYTES)"


@pytest.mark.parametrize(("path", "model", "message"), [
    (URL, "tiny-lenet", "model 'tiny-lenet' serves image requests, not multimodal requests"),
    ("/v1/image/classify", "tiny-fusion-joint", "model 'tiny-fusion-joint' serves multimodal requests, not image requests"),
    (URL, "nope", "unknown model 'nope'; loaded models: tiny-fusion-joint, tiny-fusion-late, tiny-fusion-sentence, tiny-lenet"),
])
def test_wrong_task_or_unknown_model_is_404(mm: httpx.Client, jpegs: list[bytes], path: str, model: str,
                                            message: str) -> None:
    response = mm.post(path, params={"model": model}, files=_image_files(jpegs[:1]))
    assert response.status_code == 404
    assert response.json()["detail"] == message


def test_models_lists_the_multimodal_models(mm: httpx.Client) -> None:
    body = mm.get("/v1/models").json()
    tasks = {model["name"]: model["task"] for model in body["models"]}
    assert tasks == {"tiny-fusion-joint": "multimodal", "tiny-fusion-late": "multimodal",
                     "tiny-fusion-sentence": "multimodal", "tiny-lenet": "image"}
    assert body["defaults"] == {"image": "tiny-lenet", "multimodal": "tiny-fusion-late"}
    late = mm.get("/v1/models/tiny-fusion-late").json()
    assert late["classes"] == FUSION_CLASSES and late["calibration"] == {"temperature": 1.3}
    assert late["preprocessing"]["kind"] == "multimodal" and late["preprocessing"]["image"]["size"] == 32


def test_docs_describe_the_pairing_with_upload_fields_and_examples(mm: httpx.Client) -> None:
    schema = mm.get("/openapi.json").json()
    operation = schema["paths"][URL]["post"]
    assert "empty (or whitespace-only) `texts` field" in operation["description"]
    assert "empty `files` part" in operation["description"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = schema["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]["properties"]
    assert set(fields) == {"files", "texts"}
    assert fields["files"]["items"] == {"type": "string", "format": "binary"}  # a file picker in Swagger UI
    assert fields["texts"]["examples"]
    assert operation["responses"]["200"]["content"]["application/json"]["example"]["model"]["task"] == "multimodal"


# ---- in process: the runner refuses a pair left with no side after tokenising ---------------------

def test_a_pair_whose_text_has_no_tokens_and_no_image_is_refused_by_name(fusion_dir: Path, jpegs: list[bytes]) -> None:
    from app.errors import InvalidInput
    from app.tasks import MultimodalRunner
    from app.tasks import Pair as RunnerPair

    runner = MultimodalRunner(load_checkpoint(fusion_dir / "tiny-fusion-late"), torch.device("cpu"), 1_000_000)
    no_tokens = "\x1f"  # a control character only: the routes keep it as a text, the tokenizer drops it
    pairs = [RunnerPair(jpegs[0], no_tokens), RunnerPair(None, no_tokens)]
    with pytest.raises(InvalidInput, match=r"^pair 1 \(b\.png\): its text has no tokens left after the model's "
                                           r"preprocessing and it has no image; send a text with words in it"):
        runner.prepare(pairs, ["pair 0 (a.jpg)", "pair 1 (b.png)"])
    (alone,) = runner.prepare(pairs[:1], ["pair 0 (a.jpg)"])
    assert alone.image is not None and alone.token_ids is None  # its image is classified alone
