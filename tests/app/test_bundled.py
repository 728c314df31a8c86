"""The bundled checkpoints as the service serves them: which models, which defaults, and their lineage."""

from __future__ import annotations

import httpx
from servicekit import ROOT, Server

from models.checkpoint import read_manifest

BUNDLED = ROOT / "checkpoints"


def test_both_text_models_are_served_the_n_gram_model_by_default(bundled_server: Server) -> None:
    listing = httpx.get(f"{bundled_server.url}/v1/models", timeout=10).json()
    text_models = sorted(model["name"] for model in listing["models"] if model["task"] == "text")
    assert text_models == ["20news-text", "20news-trunk"] and listing["defaults"]["text"] == "20news-text"
    post = "Subject: orbit insertion\n\nThe probe fired its engine for the orbit insertion around Jupiter."
    for name in text_models:
        response = httpx.post(f"{bundled_server.url}/v1/text/classify", params={"model": name}, json={"text": post},
                              timeout=30)
        assert response.status_code == 200 and response.json()["model"]["name"] == name
        assert response.json()["predictions"][0]["label"] == "sci.space"


def test_the_image_initialised_text_model_names_the_image_checkpoint_it_came_from(bundled_server: Server) -> None:
    info = httpx.get(f"{bundled_server.url}/v1/models/20news-trunk", timeout=10).json()
    image = read_manifest(BUNDLED / "cifar10-trunk")
    assert info["architecture"] == "trunk" and info["lineage"] is not None
    assert info["lineage"]["name"] == "cifar10-trunk"
    assert info["lineage"]["weights_sha256"] == image.weights_sha256  # the bundled image trunk, not another
    assert "path" not in info["lineage"]  # where it lay on the training machine stays in the manifest
    assert info["calibration"]["temperature"] > 0 and info["metrics"]["validation"]["accuracy"] > 0.8


def test_the_default_image_model_is_an_ensemble_whose_first_member_is_the_bundled_cnn(bundled_server: Server) -> None:
    listing = httpx.get(f"{bundled_server.url}/v1/models", timeout=10).json()
    assert listing["defaults"]["image"] == "cifar10-ensemble"
    info = httpx.get(f"{bundled_server.url}/v1/models/cifar10-ensemble", timeout=10).json()
    assert info["architecture"] == "image_ensemble"
    members = info["lineage"]["members"]
    assert len(members) == 4
    assert members[0]["name"] == "cifar10-fastconv"
    assert members[0]["weights_sha256"] == read_manifest(BUNDLED / "cifar10-fastconv").weights_sha256
    assert len({member["weights_sha256"] for member in members}) == 4
    assert all("path" not in member for member in members)
    validation = info["metrics"]["validation"]
    assert validation["accuracy"] > max(member["accuracy"] for member in validation["members"])
    assert set(info["calibration"]["top_label"]) == {"log_top_weight", "log_rest_weight", "intercept"}


def test_no_lineage_in_the_public_api_names_a_file_path(bundled_server: Server) -> None:
    def keys(value: object) -> set[str]:
        if isinstance(value, dict):
            return set(value) | {key for item in value.values() for key in keys(item)}
        return set()

    models = httpx.get(f"{bundled_server.url}/v1/models", timeout=10).json()["models"]
    fusion = next(model for model in models if model["name"] == "mvsa-fusion")
    assert "path" in keys(read_manifest(BUNDLED / "mvsa-fusion").parent)  # the manifest keeps it …
    assert fusion["lineage"] and all("path" not in keys(model["lineage"]) for model in models)  # … the API does not


def test_the_image_initialised_text_model_answers_through_v2_as_through_v1(bundled_server: Server) -> None:
    post = "My 486 will not boot after I installed the new IDE controller card."
    v1 = httpx.post(f"{bundled_server.url}/v1/text/classify", params={"model": "20news-trunk"}, json={"text": post},
                    timeout=30).json()
    v2 = httpx.post(f"{bundled_server.url}/v2/models/20news-trunk/infer", timeout=30, json={
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [post]}]}).json()
    output = next(item for item in v2["outputs"] if item["name"] == "probabilities")
    classes = httpx.get(f"{bundled_server.url}/v1/models/20news-trunk", timeout=10).json()["classes"]
    assert output["shape"] == [1, len(classes)]
    expected = [v1["predictions"][0]["probabilities"][name] for name in classes]
    assert max(abs(a - b) for a, b in zip(output["data"], expected, strict=True)) < 1e-6


def test_paths_are_left_out_of_lineage_and_metrics_at_any_depth() -> None:
    from app.registry import _without_paths

    manifest_part = {"path": "/srv/a", "name": "x", "folds": [{"measured_on": {"path": "/srv/b", "weights": "h"}}]}
    assert _without_paths(manifest_part) == {"name": "x", "folds": [{"measured_on": {"weights": "h"}}]}
    assert _without_paths(None) is None and _without_paths([1, "path"]) == [1, "path"]
