"""GET /v1/models, health, readiness, metrics, docs and API keys."""

from __future__ import annotations

import re

import httpx
import pytest
from servicekit import API_KEY


def test_models_lists_every_loaded_checkpoint_with_its_contract(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert [model["name"] for model in body["models"]] == ["tiny-fastconv", "tiny-lenet", "tiny-text"]
    assert body["defaults"] == {"image": "tiny-fastconv", "text": "tiny-text"}
    lenet = body["models"][1]
    assert lenet["task"] == "image" and lenet["architecture"] == "lenet" and lenet["default"] is False
    assert lenet["classes"][:2] == ["airplane", "automobile"]
    assert lenet["preprocessing"]["size"] == 32 and lenet["calibration"] == {"temperature": 1.5}
    assert lenet["device"] == "cpu" and lenet["version"] == "1" and lenet["metrics"] == {"val_accuracy": 0.1}
    assert "lineage" in lenet


def test_model_details_and_unknown_model(client: httpx.Client) -> None:
    assert client.get("/v1/models/tiny-text").json()["task"] == "text"
    response = client.get("/v1/models/nope")
    assert response.status_code == 404
    assert response.json()["detail"].startswith("unknown model 'nope'")


def test_health_readiness_and_metrics_are_open_without_a_key(main_server) -> None:
    assert httpx.get(main_server.url + "/healthz").json() == {"status": "alive"}
    ready = httpx.get(main_server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = httpx.get(main_server.url + "/metrics")
    assert metrics.status_code == 200 and "crossmodal_http_requests_total" in metrics.text


@pytest.mark.parametrize(("headers", "message"), [
    ({}, "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"),
    ({"X-API-Key": "wrong"}, "the API key is not valid"),
    ({"Authorization": "Bearer wrong"}, "the API key is not valid"),
])
def test_v1_needs_a_valid_api_key_when_keys_are_set(main_server, headers: dict, message: str) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/text/classify")):
        response = httpx.request(method, main_server.url + path, headers=headers, json={"text": "hi"})
        assert response.status_code == 401
        assert response.json()["detail"] == message
        assert response.headers["www-authenticate"] == "Bearer"


def test_bearer_and_header_keys_are_both_accepted(main_server) -> None:
    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": "test-key-2"}):
        assert httpx.get(main_server.url + "/v1/models", headers=headers).status_code == 200


def test_no_key_needed_when_api_keys_unset(probe: httpx.Client) -> None:
    assert probe.get("/v1/models").status_code == 200


def test_docs_pages_load_their_assets_from_the_service_not_a_cdn(main_server) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(main_server.url + page).text
        assert "cdn." not in html and "https://" not in html.split("<body>")[0]
        scripts = re.findall(r'src="([^"]+\.js)"', html)
        assert scripts, html
        for script in scripts:
            asset = httpx.get(main_server.url + script)
            assert asset.status_code == 200 and len(asset.content) > 100_000  # the real bundle, not an error page


def test_docs_offer_file_upload_and_examples(main_server) -> None:
    assert httpx.get(main_server.url + "/docs").status_code == 200
    schema = httpx.get(main_server.url + "/openapi.json").json()
    image = schema["paths"]["/v1/image/classify"]["post"]
    form = image["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["$ref"].startswith("#/components/schemas/")
    fields = schema["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]["properties"]
    assert set(fields) == {"files", "file"}
    # plain binary strings: what Swagger UI turns into file pickers
    assert fields["files"]["items"] == {"type": "string", "format": "binary"}
    assert fields["file"]["type"] == "string" and fields["file"]["format"] == "binary"
    text_schema = schema["components"]["schemas"]["TextClassifyRequest"]
    assert text_schema["examples"]
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
    for path, operations in schema["paths"].items():  # with API_KEYS set, every /v1 and /v2 operation asks for a
        guarded = path.startswith("/v1/") or (path.startswith("/v2") and not path.startswith("/v2/health/"))  # key
        for operation in operations.values():  # but the probes
            assert bool(operation.get("security")) == guarded, path


def test_unknown_path_is_a_json_404(client: httpx.Client) -> None:
    response = client.get("/v3/nothing")
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}
    response = client.get("/v2/nothing")  # the Open Inference Protocol's error shape under /v2
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}


def test_without_api_keys_the_openapi_document_asks_for_none(probe: httpx.Client) -> None:
    schema = probe.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert all("security" not in operation for path in schema["paths"].values() for operation in path.values())
