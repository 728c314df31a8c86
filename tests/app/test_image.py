"""POST /v1/image/classify end to end through a real uvicorn process."""

from __future__ import annotations

import io
import math

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from servicekit import CLASSES, IMAGE_PREPROCESSING, encode

from models import build_model
from models.calibration import Calibration
from models.checkpoint import load_checkpoint, new_manifest, save_checkpoint


def _files(images: list[bytes], field: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"image{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


def _check_prediction(prediction: dict, top_k: int = 5) -> None:
    probabilities = prediction["probabilities"]
    assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-5)
    assert prediction["label"] == max(probabilities, key=probabilities.get)
    assert prediction["probability"] == probabilities[prediction["label"]]
    listed = prediction["top_k"]
    assert len(listed) == top_k
    assert [entry["probability"] for entry in listed] == sorted(probabilities.values(), reverse=True)[:top_k]
    assert listed[0]["label"] == prediction["label"]


def _standardised(jpeg: bytes) -> torch.Tensor:
    """(1, 3, 32, 32): the test checkpoints' preprocessing of a 32×32 JPEG, done here by hand."""
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)  # (32, 32, 3)
    mean, std = np.array([0.49, 0.48, 0.45]) * 255, np.array([0.25, 0.24, 0.26]) * 255
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1)).float()[None]


def test_classify_returns_one_calibrated_prediction_per_file_in_order(client: httpx.Client, jpegs: list[bytes]) -> None:
    response = client.post("/v1/image/classify", files=_files(jpegs[:3]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "tiny-fastconv", "version": "1", "task": "image"}
    assert len(body["predictions"]) == 3
    for prediction in body["predictions"]:
        _check_prediction(prediction)
    assert body["request_id"] == response.headers["x-request-id"]
    alone = client.post("/v1/image/classify", files=_files(jpegs[1:2])).json()["predictions"][0]
    assert alone["probabilities"] == pytest.approx(body["predictions"][1]["probabilities"], abs=1e-5)


def test_classify_matches_the_checkpoint_with_its_temperature(client: httpx.Client, jpegs: list[bytes],
                                                             model_dir) -> None:
    response = client.post("/v1/image/classify", params={"model": "tiny-lenet", "top_k": 3},
                           files=[("file", ("cat.jpg", jpegs[0], "image/jpeg"))])
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    _check_prediction(prediction, top_k=3)
    loaded = load_checkpoint(model_dir / "tiny-lenet")
    with torch.no_grad():
        expected = torch.softmax(loaded.model(_standardised(jpegs[0])) / 1.5, dim=-1)[0].tolist()
    assert list(prediction["probabilities"].values()) == pytest.approx(expected, abs=1e-5)


def test_an_ensemble_with_a_top_label_map_answers_what_its_manifest_says(start_server, tmp_path, jpegs: list[bytes]) -> None:
    model = build_model("image_ensemble", {"member_architecture": "fastconv", "members": 3,
                                           "member_config": {"num_classes": 10, "widths": [8, 16, 16]}})
    calibration = {"temperature": 0.5, "top_label": {"log_top_weight": 0.7, "log_rest_weight": 1.2,
                                                         "intercept": -0.4}}
    save_checkpoint(tmp_path / "models" / "tiny-ensemble", model, new_manifest(
        "tiny-ensemble", "image", "image_ensemble", model.config, classes=CLASSES,  # type: ignore[arg-type]
        preprocessing=IMAGE_PREPROCESSING, calibration=calibration))
    server = start_server({"MODEL_DIR": str(tmp_path / "models"), "PRECISION": "fp32", "TOKENIZER_PROCESSES": "1"})
    server.wait_ready()
    response = httpx.post(server.url + "/v1/image/classify", files=_files(jpegs[:2]), timeout=60)
    assert response.status_code == 200, response.text
    loaded = load_checkpoint(tmp_path / "models" / "tiny-ensemble")
    with torch.no_grad():
        expected = Calibration.from_manifest(calibration).probabilities(
            loaded.model(torch.cat([_standardised(jpeg) for jpeg in jpegs[:2]])))
        tempered = torch.softmax(loaded.model(torch.cat([_standardised(jpeg) for jpeg in jpegs[:2]])) / 0.5, dim=-1)
    for prediction, row, tempered_row in zip(response.json()["predictions"], expected, tempered, strict=True):
        _check_prediction(prediction)
        assert list(prediction["probabilities"].values()) == pytest.approx(row.tolist(), abs=1e-5)
        assert prediction["probability"] != pytest.approx(tempered_row.max().item(), abs=1e-3)  # the map, not only T


def test_top_k_is_capped_at_the_number_of_classes(client: httpx.Client, jpegs: list[bytes]) -> None:
    response = client.post("/v1/image/classify", params={"top_k": 50}, files=_files(jpegs[:1]))
    assert response.status_code == 200
    _check_prediction(response.json()["predictions"][0], top_k=10)


def test_classify_accepts_every_common_format_and_mode(client: httpx.Client, jpegs: list[bytes]) -> None:
    photo = Image.open(io.BytesIO(jpegs[0])).convert("RGB").resize((64, 48))
    sixteen_bit = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    frames = [photo, photo.rotate(90)]
    images = [
        encode(photo, "PNG"), encode(photo, "WEBP"), encode(photo, "BMP"),
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        encode(photo.convert("RGBA"), "PNG"), encode(photo.convert("CMYK"), "JPEG"),
        encode(sixteen_bit, "PNG"), encode(photo.convert("P"), "PNG"),
    ]
    # the declared content type is ignored: the bytes say what the format is
    files = [("files", (f"upload{i}.txt", data, "text/plain")) for i, data in enumerate(images)]
    response = client.post("/v1/image/classify", files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == len(images)


@pytest.mark.parametrize(("payload", "status", "message"), [
    (b"hello, this is text", 415, "unsupported image format: send JPEG, PNG, WebP, BMP or GIF"),
    (b"II*\x00" + bytes(100), 415, "unsupported image format"),  # TIFF
    (b"", 400, "image 0 (image0.jpg): the file is empty"),
])
def test_classify_rejects_non_images(client: httpx.Client, payload: bytes, status: int, message: str) -> None:
    response = client.post("/v1/image/classify", files=_files([payload]))
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_classify_rejects_truncated_jpeg(client: httpx.Client, jpegs: list[bytes]) -> None:
    response = client.post("/v1/image/classify", files=_files([jpegs[0], jpegs[1][:200]]))
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("image 1 (image1.jpg): cannot decode the JPEG image (truncated or corrupt?)")


def test_classify_refuses_decompression_bomb_without_decoding(client: httpx.Client) -> None:
    bomb = encode(Image.new("L", (4000, 4000)), "PNG")  # 16 megapixels in a few kB; the server allows 1
    assert len(bomb) < 50_000
    response = client.post("/v1/image/classify", files=_files([bomb]))
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert detail.startswith("image 0 (image0.jpg): image is too large")
    assert "at most 1,000,000 pixels are accepted (decompression-bomb guard" in detail


def test_classify_refuses_body_over_limit_from_content_length(client: httpx.Client) -> None:
    response = client.post("/v1/image/classify", files=_files([bytes(400_000)]))
    assert response.status_code == 413
    assert response.json()["detail"] == "request body is larger than the limit of 300,000 bytes (MAX_UPLOAD_BYTES)"


def test_classify_refuses_streamed_body_over_limit_while_reading(client: httpx.Client, jpegs: list[bytes]) -> None:
    boundary = "xmboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def chunks():  # no Content-Length: sent chunked, counted by the server as it arrives
        yield head + jpegs[0]
        for _ in range(40):
            yield bytes(16_384)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/v1/image/classify", content=chunks(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert "MAX_UPLOAD_BYTES" in response.json()["detail"]


@pytest.mark.parametrize(("params", "message"), [
    ({"top_k": 0}, "top_k: Input should be greater than or equal to 1"),
    ({"top_k": "many"}, "top_k: Input should be a valid integer"),
])
def test_classify_rejects_bad_top_k(client: httpx.Client, jpegs: list[bytes], params: dict, message: str) -> None:
    response = client.post("/v1/image/classify", params=params, files=_files(jpegs[:1]))
    assert response.status_code == 422
    assert response.json()["detail"].startswith(message)


def test_classify_rejects_requests_without_images(client: httpx.Client) -> None:
    response = client.post("/v1/image/classify", files=[("image", ("a.jpg", b"x", "image/jpeg"))])
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "no images in the request: send them in the multipart field 'files' (or one in 'file')")


def test_classify_rejects_too_many_images(client: httpx.Client, jpegs: list[bytes]) -> None:
    response = client.post("/v1/image/classify", files=_files(jpegs[:9]))
    assert response.status_code == 422
    assert response.json()["detail"] == "too many images: 9 (at most 8 per request, MAX_ITEMS_PER_REQUEST)"


@pytest.mark.parametrize(("model", "message"), [
    ("no-such-model", "unknown model 'no-such-model'; loaded models: tiny-fastconv, tiny-lenet, tiny-text"),
    ("../tiny-lenet", "unknown model '../tiny-lenet'"),
    ("tiny-text", "model 'tiny-text' serves text requests, not image requests"),
])
def test_classify_answers_404_for_unknown_or_wrong_task_model(client: httpx.Client, jpegs: list[bytes], model: str,
                                                              message: str) -> None:
    response = client.post("/v1/image/classify", params={"model": model}, files=_files(jpegs[:1]))
    assert response.status_code == 404
    assert response.json()["detail"].startswith(message)


def test_service_keeps_serving_after_bad_requests(client: httpx.Client, jpegs: list[bytes]) -> None:
    for payload in (b"junk", jpegs[0][:100], bytes(400_000)):
        assert client.post("/v1/image/classify", files=_files([payload])).status_code >= 400
    assert client.post("/v1/image/classify", files=_files(jpegs[:2])).status_code == 200
