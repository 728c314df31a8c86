"""POST /v1/text/classify end to end through a real uvicorn process."""

from __future__ import annotations

import math
import time

import httpx
import pytest
import torch
from servicekit import metric

from models.checkpoint import load_checkpoint
from models.text_encoding import load_text_encoder


def test_classify_texts_returns_calibrated_predictions_in_order(client: httpx.Client, model_dir) -> None:
    texts = ["The shuttle launch was delayed again.", "Which graphics card works with X11?", "goalie"]
    response = client.post("/v1/text/classify", json={"texts": texts}, params={"top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "tiny-text", "version": "1", "task": "text"}
    loaded = load_checkpoint(model_dir / "tiny-text")
    encoder = load_text_encoder(model_dir / "tiny-text", loaded.manifest)
    for text, prediction in zip(texts, body["predictions"], strict=True):
        with torch.no_grad():
            expected = torch.softmax(loaded.model(token_ids=encoder.encode([text])), dim=-1)[0].tolist()
        assert list(prediction["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
        assert math.isclose(sum(prediction["probabilities"].values()), 1.0, abs_tol=1e-5)
        assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
        assert len(prediction["top_k"]) == 2


def test_texts_are_tokenised_in_a_worker_process_once_it_is_up(client: httpx.Client, model_dir) -> None:
    """TOKENIZER_PROCESSES=1: the pool starts beside the warm-up; once it is up, texts skip the service's GIL."""
    texts = ["The goalie made saves", "graphics card"]
    until = time.monotonic() + 60
    while metric(str(client.base_url), "crossmodal_texts_tokenised_total", {"where": "process"}) == 0:
        assert time.monotonic() < until, "no text was tokenised in a worker process within 60 s"
        response = client.post("/v1/text/classify", json={"texts": texts})
        assert response.status_code == 200, response.text
        time.sleep(0.2)
    response = client.post("/v1/text/classify", json={"texts": texts})  # through the process: same answers
    loaded = load_checkpoint(model_dir / "tiny-text")
    encoder = load_text_encoder(model_dir / "tiny-text", loaded.manifest)
    with torch.no_grad():
        expected = torch.softmax(loaded.model(token_ids=encoder.encode(texts)), dim=-1).tolist()
    for prediction, row in zip(response.json()["predictions"], expected, strict=True):
        assert list(prediction["probabilities"].values()) == pytest.approx(row, abs=1e-5)


def test_classify_accepts_a_single_text(client: httpx.Client) -> None:
    response = client.post("/v1/text/classify", json={"text": "hockey playoffs"})
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 1


@pytest.mark.parametrize(("body", "message"), [
    ({"texts": []}, "no texts in the request"),
    ({}, "no texts in the request"),
    ({"texts": ["fine", " \n\t "]}, "text 1 is empty or only whitespace"),
    ({"text": ""}, "text 0 is empty or only whitespace"),
    ({"texts": ["x" * 501]}, "text 0 has 501 characters; at most 500 are accepted (MAX_TEXT_CHARS)"),
    ({"texts": ["a"] * 9}, "too many texts: 9 (at most 8 per request, MAX_ITEMS_PER_REQUEST)"),
    ({"texts": ["a"], "text": "b"}, "send either 'texts' (a list) or 'text' (one string), not both"),
    ({"texts": "not a list"}, "texts: Input should be a valid list"),
    ({"texts": ["a"], "extra": 1}, "extra: Extra inputs are not permitted"),
])
def test_classify_rejects_invalid_text_requests(client: httpx.Client, body: dict, message: str) -> None:
    response = client.post("/v1/text/classify", json=body)
    assert response.status_code == 422
    assert response.json()["detail"] == message


def test_classify_rejects_a_lone_surrogate(client: httpx.Client) -> None:
    """JSON may escape half a surrogate pair (a client that cut an emoji in two): 422, not a tokenizer crash."""
    body = b'{"texts": ["fine", "half an emoji \\ud83d"]}'
    response = client.post("/v1/text/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"] == "text 1 is not valid Unicode: a lone surrogate (U+D83D) at character 14"
    assert client.post("/v1/text/classify", json={"text": "hockey"}).status_code == 200  # and it goes on serving


def test_classify_rejects_malformed_json(client: httpx.Client) -> None:
    response = client.post("/v1/text/classify", content=b'{"texts": ["unterminated', headers={"Content-Type":
                                                                                              "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("request body is not valid JSON")


def test_classify_rejects_json_that_is_not_utf8(client: httpx.Client) -> None:
    response = client.post("/v1/text/classify", content=b'{"text": "caf\xe9"}', headers={"Content-Type":
                                                                                        "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"] == "request body is not valid JSON (it must be UTF-8 text)"


def test_classify_rejects_bad_top_k_for_texts(client: httpx.Client) -> None:
    response = client.post("/v1/text/classify", params={"top_k": -1}, json={"text": "hello"})
    assert response.status_code == 422
    assert response.json()["detail"] == "top_k: Input should be greater than or equal to 1"


def test_classify_texts_answers_404_for_an_image_model(client: httpx.Client) -> None:
    response = client.post("/v1/text/classify", params={"model": "tiny-lenet"}, json={"text": "hello"})
    assert response.status_code == 404
    assert response.json()["detail"] == "model 'tiny-lenet' serves image requests, not text requests"
