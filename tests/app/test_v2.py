"""The Open Inference Protocol v2 routes end to end: a real uvicorn process, driven by ``tritonclient.http``
for what clients do and by raw HTTP for what attackers do. One server for the module: image, text and pair models."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servicekit import API_KEY, CLASSES, FUSION_CLASSES, Server, encode, metric, save_fusion_model, save_image_model, serving

triton = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TEXT_CLASSES = ["space", "graphics", "hockey"]
TEXTS = ["The shuttle launch was delayed", "Which graphics card runs X11", "The goalie made saves"]


@pytest.fixture(scope="module")
def v2_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """tiny-lenet (image, temperature 1.5), tiny-text, tiny-fusion (pairs); API keys on, small limits."""
    directory = tmp_path_factory.mktemp("v2-models")
    save_image_model(directory, "tiny-lenet", "lenet", {"num_classes": 10}, temperature=1.5)
    shutil.copytree(model_dir / "tiny-text", directory / "tiny-text")
    save_fusion_model(directory, "tiny-fusion", "fusion_late", temperature=1.3)
    env = {"MODEL_DIR": str(directory), "API_KEYS": API_KEY, "MAX_ITEMS_PER_REQUEST": "8", "MAX_TEXT_CHARS": "200",
           "MAX_JSON_BYTES": "100000", "MAX_IMAGE_PIXELS": "1000000", "MAX_BATCH_SIZE": "16", "MAX_WAIT_MS": "5",
           "TOKENIZER_PROCESSES": "0", "PRECISION": "fp32"}
    with serving(tmp_path_factory.mktemp("v2-server") / "server.log", env) as server:
        yield server


@pytest.fixture(scope="module")
def triton_client(v2_server: Server) -> Iterator[object]:
    client = triton.InferenceServerClient(url=v2_server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture
def http(v2_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=v2_server.url, headers=_key(), timeout=30) as session:
        yield session


def _key() -> dict[str, str]:
    """The API key header, a fresh dict each time: tritonclient adds its own headers to the one it is given."""
    return {"X-API-Key": API_KEY}


def _bytes_input(name: str, elements: list[bytes] | list[str], binary: bool = True) -> object:
    tensor = triton.InferInput(name, [len(elements)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
    return tensor


def _infer(client: object, model: str, inputs: list[object], binary_output: bool = True, class_count: int = 0,
           **options: object) -> object:
    output = triton.InferRequestedOutput("probabilities", binary_data=binary_output, class_count=class_count)
    return client.infer(model, inputs, outputs=[output], headers=_key(), **options)


def _v1(response: httpx.Response, classes: list[str]) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([[p["probabilities"][c] for c in classes] for p in response.json()["predictions"]])


def _v1_images(http: httpx.Client, model: str, images: list[bytes]) -> np.ndarray:
    files = [("files", (f"{i}.jpg", image, "image/jpeg")) for i, image in enumerate(images)]
    return _v1(http.post("/v1/image/classify", params={"model": model}, files=files), CLASSES)


def _v1_texts(http: httpx.Client, texts: list[str]) -> np.ndarray:
    return _v1(http.post("/v1/text/classify", params={"model": "tiny-text"}, json={"texts": texts}), TEXT_CLASSES)


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(len(element).to_bytes(4, "little") + element for element in elements)


def _binary_request(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    encoded = json.dumps(header).encode()
    return encoded + b"".join(blobs), {"Inference-Header-Content-Length": str(len(encoded))}


# ---- health, metadata, versions, auth -----------------------------------------------------------


def test_probes_answer_without_a_key(v2_server: Server, triton_client) -> None:
    assert httpx.get(v2_server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(v2_server.url + "/v2/health/ready").json() == {"ready": True}
    assert triton_client.is_server_live() and triton_client.is_server_ready()


def test_server_metadata_names_the_extensions(triton_client) -> None:
    metadata = triton_client.get_server_metadata(headers=_key())
    assert metadata["name"] == "crossmodal"
    assert set(metadata["extensions"]) == {"binary_tensor_data", "classification"}


@pytest.mark.parametrize(("model", "inputs", "classes"), [
    ("tiny-lenet", ["image"], CLASSES), ("tiny-text", ["text"], TEXT_CLASSES),
    ("tiny-fusion", ["image", "text"], FUSION_CLASSES)])
def test_model_metadata_describes_tensors_and_classes(triton_client, model, inputs, classes) -> None:
    metadata = triton_client.get_model_metadata(model, headers=_key())
    assert metadata["name"] == model and metadata["versions"] == ["1"] and metadata["platform"] == "pytorch"
    assert metadata["inputs"] == [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in inputs]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]}]
    assert metadata["parameters"]["classes"] == classes
    assert triton_client.get_model_metadata(model, model_version="1", headers=_key()) == metadata
    assert triton_client.is_model_ready(model, headers=_key())
    assert triton_client.is_model_ready(model, model_version="1", headers=_key())


def test_a_version_other_than_the_loaded_one_is_not_found(http: httpx.Client, triton_client) -> None:
    message = "model 'tiny-text' has no version '2'; the loaded version is '1'"
    for path in ("/v2/models/tiny-text/versions/2", "/v2/models/tiny-text/versions/2/ready"):
        response = http.get(path)
        assert (response.status_code, response.json()) == (404, {"error": message})
    with pytest.raises(InferenceServerException) as raised:
        _infer(triton_client, "tiny-text", [_bytes_input("text", TEXTS[:1])], model_version="2")
    assert (raised.value.status(), raised.value.message()) == ("404", message)
    assert not triton_client.is_model_ready("tiny-text", model_version="2", headers=_key())


def test_an_unknown_model_is_not_found(http: httpx.Client, triton_client) -> None:
    message = "unknown model 'nope'; loaded models: tiny-fusion, tiny-lenet, tiny-text"
    for path in ("/v2/models/nope", "/v2/models/nope/ready"):
        response = http.get(path)
        assert (response.status_code, response.json()) == (404, {"error": message})
    with pytest.raises(InferenceServerException) as raised:
        _infer(triton_client, "nope", [_bytes_input("text", TEXTS[:1])])
    assert (raised.value.status(), raised.value.message()) == ("404", message)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v2"), ("GET", "/v2/models/tiny-text"), ("GET", "/v2/models/tiny-text/ready"),
    ("POST", "/v2/models/tiny-text/infer"), ("POST", "/v2/models/tiny-text/versions/1/infer")])
def test_model_routes_need_the_key(v2_server: Server, method: str, path: str) -> None:
    response = httpx.request(method, v2_server.url + path, content=b"{}")
    assert response.status_code == 401
    assert response.json() == {"error": "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"}
    wrong = httpx.request(method, v2_server.url + path, headers={"Authorization": "Bearer wrong"})
    assert (wrong.status_code, wrong.json()) == (401, {"error": "the API key is not valid"})


def test_tritonclient_without_the_key_gets_401(triton_client) -> None:
    with pytest.raises(InferenceServerException) as raised:
        triton_client.infer("tiny-text", [_bytes_input("text", TEXTS[:1])])
    assert raised.value.status() == "401"


def test_unknown_paths_and_methods_answer_in_the_protocols_shape(http: httpx.Client) -> None:
    missing = http.get("/v2/nothing/here")
    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    wrong_method = http.get("/v2/models/tiny-text/infer")
    assert (wrong_method.status_code, wrong_method.json()) == (405, {"error": "Method Not Allowed"})


# ---- inference: the same distributions as /v1 ----------------------------------------------------


@pytest.mark.parametrize(("binary_input", "binary_output"), [(True, True), (True, False), (False, False)])
def test_text_probabilities_equal_v1(triton_client, http: httpx.Client, binary_input, binary_output) -> None:
    result = _infer(triton_client, "tiny-text", [_bytes_input("text", TEXTS, binary_input)], binary_output)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 3)
    np.testing.assert_allclose(probabilities, _v1_texts(http, TEXTS), atol=1e-6)
    output = result.get_output("probabilities")
    assert ("parameters" in output) is binary_output and ("data" in output) is not binary_output
    assert result.get_response()["model_name"] == "tiny-text" and result.get_response()["model_version"] == "1"


@pytest.mark.parametrize("binary_output", [True, False])
def test_image_probabilities_equal_v1(triton_client, http: httpx.Client, jpegs: list[bytes], binary_output) -> None:
    result = _infer(triton_client, "tiny-lenet", [_bytes_input("image", jpegs[:4])], binary_output, request_id="r-7")
    np.testing.assert_allclose(result.as_numpy("probabilities"), _v1_images(http, "tiny-lenet", jpegs[:4]), atol=1e-6)
    assert result.get_response()["id"] == "r-7"


def test_pair_probabilities_equal_v1_including_missing_sides(triton_client, http: httpx.Client, jpegs) -> None:
    images = [jpegs[0], b"", jpegs[1]]  # pair 1: no image
    texts = ["Best day ever at the beach", "ugh stuck in traffic again", ""]  # pair 2: no text
    result = _infer(triton_client, "tiny-fusion", [_bytes_input("image", images), _bytes_input("text", texts, False)])
    files = [("files", (f"{i}.jpg", image, "image/jpeg")) for i, image in enumerate(images)]
    expected = _v1(http.post("/v1/multimodal/classify", params={"model": "tiny-fusion"}, files=files,
                             data={"texts": texts}), FUSION_CLASSES)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    text_only = _infer(triton_client, "tiny-fusion", [_bytes_input("text", texts[:2])])  # no image input at all
    expected = _v1(http.post("/v1/multimodal/classify", params={"model": "tiny-fusion"}, data={"texts": texts[:2]}),
                   FUSION_CLASSES)
    np.testing.assert_allclose(text_only.as_numpy("probabilities"), expected, atol=1e-6)


@pytest.mark.parametrize("binary_output", [True, False])
def test_classification_lists_the_top_k_as_value_index_label(triton_client, http: httpx.Client, binary_output) -> None:
    result = _infer(triton_client, "tiny-text", [_bytes_input("text", TEXTS)], binary_output, class_count=2)
    classified = result.as_numpy("probabilities")
    assert classified.shape == (3, 2)
    expected = _v1_texts(http, TEXTS)
    for row, item in zip(expected, classified, strict=True):
        entries = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in item]
        order = np.argsort(-row, kind="stable")[:2]
        assert [int(index) for _, index, _ in entries] == order.tolist()
        assert [label for _, _, label in entries] == [TEXT_CLASSES[i] for i in order]
        np.testing.assert_allclose([float(value) for value, _, _ in entries], row[order], atol=1e-6)


def test_a_class_count_beyond_the_classes_lists_them_all(triton_client) -> None:
    result = _infer(triton_client, "tiny-text", [_bytes_input("text", TEXTS[:1])], class_count=50)
    assert result.as_numpy("probabilities").shape == (1, 3)


def test_without_requested_outputs_all_come_back_in_binary(triton_client, http: httpx.Client) -> None:
    result = triton_client.infer("tiny-text", [_bytes_input("text", TEXTS)], headers=_key())  # binary_data_output
    assert "binary_data_size" in result.get_output("probabilities")["parameters"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), _v1_texts(http, TEXTS), atol=1e-6)


def test_versioned_inference_and_metrics_by_route(v2_server: Server, triton_client, http: httpx.Client) -> None:
    labels = {"route": "/v2/models/{name}/versions/{version}/infer", "method": "POST", "status": "200"}
    before = metric(v2_server.url, "crossmodal_http_requests_total", labels)
    result = _infer(triton_client, "tiny-text", [_bytes_input("text", TEXTS)], model_version="1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), _v1_texts(http, TEXTS), atol=1e-6)
    assert metric(v2_server.url, "crossmodal_http_requests_total", labels) == before + 1
    refused = {**labels, "route": "/v2/models/{name}/infer", "status": "400"}
    before = metric(v2_server.url, "crossmodal_http_requests_total", refused)
    http.post("/v2/models/tiny-text/infer", content=b"[]")
    assert metric(v2_server.url, "crossmodal_http_requests_total", refused) == before + 1


def test_raw_json_request_without_binary_data(http: httpx.Client) -> None:
    body = {"id": "plain", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS[:2]}]}
    response = http.post("/v2/models/tiny-text/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "plain" and answer["outputs"][0]["shape"] == [2, 3]
    np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (2, 3)), _v1_texts(http, TEXTS[:2]), atol=1e-6)


# ---- attacks and mistakes: cheap refusals with a message ----------------------------------------

TEXT = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}


def _text_input(**changes: object) -> dict:
    return {**TEXT, **changes}


JSON_REFUSALS = [
    ({"inputs": [_text_input(name="texts")]}, "unknown input 'texts'; model 'tiny-text' takes 'text'"),
    ({"inputs": [TEXT, TEXT]}, "2 inputs; model 'tiny-text' takes 'text'"),
    ({"inputs": [_text_input(datatype="FP32")]}, "input 'text': datatype must be 'BYTES', not 'FP32'"),
    ({"inputs": [_text_input(shape=[-1])]}, "input 'text': shape must be [N], N items, not [-1]"),
    ({"inputs": [_text_input(shape=[1, 1])]}, "input 'text': shape must be [N], N items, not [1, 1]"),
    ({"inputs": [_text_input(shape=[True])]}, "input 'text': shape must be [N], N items, not [True]"),
    ({"inputs": [_text_input(shape=[2**63])]}, "input 'text': shape must be [N], N items, not [9223372036854775808]"),
    ({"inputs": [_text_input(shape=[0], data=[])]}, "no elements in input 'text' in the request"),
    ({"inputs": [_text_input(shape=[2])]}, "input 'text': 'data' must be a flat list of 2 strings, as its shape says"),
    ({"inputs": [_text_input(data=[1])]}, "input 'text': 'data' must be a flat list of 1 strings, as its shape says"),
    ({"inputs": [_text_input(data=[["hello"]])]},
     "input 'text': 'data' must be a flat list of 1 strings, as its shape says"),
    ({"inputs": [_text_input(data=["   "])]}, "text 0 is empty or only whitespace"),
    ({"inputs": [_text_input(data=["x" * 201])]}, "text 0 has 201 characters; at most 200 are accepted (MAX_TEXT_CHARS)"),
    ({"inputs": [_text_input(data=["\ud800"])]},
     "text 0 is not valid Unicode: a lone surrogate (U+D800) at character 0"),
    ({"inputs": []}, "the inference request needs 'inputs': a list of tensors; model 'tiny-text' takes 'text'"),
    ({"input": [TEXT]}, "unknown field 'input' in the inference request; it takes 'id', 'parameters', 'inputs' and "
                        "'outputs'"),
    ({"inputs": [_text_input(parameters={"shared_memory_region": "r"})]},
     "input 'text': shared memory is not supported; send the data in the request"),
    ({"inputs": [_text_input(parameters={"binary_data_size": -1})]},
     "input 'text': binary_data_size must be a whole number of bytes"),
    ({"inputs": [_text_input(parameters={"binary_data_size": 9})]},
     "input 'text' has both 'data' and binary_data_size; send one"),
    ({"inputs": [TEXT], "outputs": [{"name": "logits"}]}, "unknown output 'logits'; this model has one, 'probabilities'"),
    ({"inputs": [TEXT], "outputs": [{"name": "probabilities"}, {"name": "probabilities"}]},
     "2 outputs requested; this model has one, 'probabilities'"),
    ({"inputs": [TEXT], "outputs": [{"name": "probabilities", "parameters": {"classification": -3}}]},
     "output 'probabilities': classification must be a whole number of classes (0: none)"),
    ({"inputs": [TEXT], "outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]},
     "output 'probabilities': binary_data must be true or false"),
    ({"inputs": [TEXT], "parameters": {"binary_data_output": 1}}, "parameters.binary_data_output must be true or false"),
    ({"inputs": [TEXT], "id": "x" * 300}, "'id' must be a string of at most 256 characters"),
    ({"inputs": [_text_input(shape=[9], data=["a"] * 9)]},
     "too many elements in input 'text': 9 (at most 8 per request, MAX_ITEMS_PER_REQUEST)"),
    ({"inputs": [_text_input(data=["a"] * 3000)]},
     "the inference request holds too many JSON values, or nests them too deeply, for a request of at most 8 items "
     "(MAX_ITEMS_PER_REQUEST)"),
    ({"inputs": [_text_input(data=[[[[[[["deep"]]]]]]])]},
     "the inference request holds too many JSON values, or nests them too deeply, for a request of at most 8 items "
     "(MAX_ITEMS_PER_REQUEST)"),
    ([TEXT], "the inference request must be a JSON object with 'inputs'"),
]


@pytest.mark.parametrize(("body", "message"), JSON_REFUSALS)
def test_text_model_refuses_bad_json_requests(http: httpx.Client, body: object, message: str) -> None:
    response = http.post("/v2/models/tiny-text/infer", content=json.dumps(body))  # \ud800 escaped, as JSON allows
    assert (response.status_code, response.json()) == (400, {"error": message})


def test_image_model_refuses_images_in_json(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["/9j/4AAQ"]}]}
    response = http.post("/v2/models/tiny-lenet/infer", json=body)
    assert (response.status_code, response.json()) == (400, {"error": (
        "input 'image': send images as binary data (binary tensor data extension, parameters.binary_data_size); "
        "JSON cannot carry their bytes")})


def _image_header(count: int, size: int) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count], "parameters": {"binary_data_size": size}}]}


def test_binary_layout_refusals(http: httpx.Client, jpegs: list[bytes]) -> None:
    image = _bytes_tensor([jpegs[0]])
    cases: list[tuple[bytes, dict[str, str], int, str]] = []
    body, headers = _binary_request(_image_header(1, len(image) + 1), image)
    cases.append((body, headers, 400, f"the inputs' binary_data_size add up to {len(image) + 1:,} bytes, but "
                                      f"{len(image):,} follow the JSON header (Inference-Header-Content-Length)"))
    body, headers = _binary_request(_image_header(1, len(image)), image, b"extra")
    cases.append((body, headers, 400, f"the inputs' binary_data_size add up to {len(image):,} bytes, but "
                                      f"{len(image) + 5:,} follow the JSON header (Inference-Header-Content-Length)"))
    body, headers = _binary_request(_image_header(2, len(image)), image)
    cases.append((body, headers, 400, "input 'image': the binary data ends before element 1 of 2"))
    lying = (10**6).to_bytes(4, "little") + jpegs[0]
    body, headers = _binary_request(_image_header(1, len(lying)), lying)
    cases.append((body, headers, 400, f"input 'image': element 0 says 1,000,000 bytes, but only {len(jpegs[0]):,} "
                                      "are left in its binary data"))
    padded = image + b"\0\0"
    body, headers = _binary_request(_image_header(1, len(padded)), padded)
    cases.append((body, headers, 400, "input 'image': 2 bytes left after its 1 elements (binary_data_size must be "
                                      "exactly their length)"))
    body, _ = _binary_request(_image_header(1, len(image)), image)
    cases.append((body, {"Inference-Header-Content-Length": "12x"}, 400,
                  "the Inference-Header-Content-Length header must be the JSON header's length in bytes"))
    cases.append((body, {"Inference-Header-Content-Length": "-5"}, 400,
                  "the Inference-Header-Content-Length header must be the JSON header's length in bytes"))
    cases.append((body, {"Inference-Header-Content-Length": "0"}, 400,
                  "the Inference-Header-Content-Length header must be the JSON header's length in bytes"))
    cases.append((body, {"Inference-Header-Content-Length": str(len(body) + 1)}, 400,
                  f"the Inference-Header-Content-Length header says {len(body) + 1:,} bytes of JSON, but the body has "
                  f"{len(body):,} bytes"))
    for huge in ("9" * 19, "9" * 5000):
        cases.append((body, {"Inference-Header-Content-Length": huge}, 400,
                      "the Inference-Header-Content-Length header must be the JSON header's length in bytes"))
    for body, headers, status, message in cases:
        response = http.post("/v2/models/tiny-lenet/infer", content=body, headers=headers)
        assert (response.status_code, response.json()) == (status, {"error": message}), message


def test_text_elements_in_binary_must_be_utf8(http: httpx.Client) -> None:
    data = _bytes_tensor([b"fine", b"\xff\xfe broken"])
    body, headers = _binary_request({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                                                 "parameters": {"binary_data_size": len(data)}}]}, data)
    response = http.post("/v2/models/tiny-text/infer", content=body, headers=headers)
    assert (response.status_code, response.json()) == (400, {"error": "text 1 is not valid UTF-8 (at byte 0)"})


def test_bad_images_get_the_v1_answers(http: httpx.Client, jpegs: list[bytes]) -> None:
    for data, status, message in [
        (jpegs[0][:200], 400, "image 1: cannot decode the JPEG image (truncated or corrupt?)"),
        (b"GIF-ish but not", 415, "image 1: unsupported image format"),
        (b"", 400, "image 1: the file is empty"),
        (encode(Image.new("RGB", (1001, 1001)), "PNG"), 413, "image 1: image is too large"),
    ]:
        tensor = _bytes_tensor([jpegs[1], data])
        body, headers = _binary_request(_image_header(2, len(tensor)), tensor)
        response = http.post("/v2/models/tiny-lenet/infer", content=body, headers=headers)
        assert response.status_code == status, response.text
        assert list(response.json()) == ["error"] and response.json()["error"].startswith(message)


def test_pairs_must_line_up_and_have_a_side(http: httpx.Client, jpegs: list[bytes]) -> None:
    images = _bytes_tensor([jpegs[0], b""])
    image_input = {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(images)}}
    for texts, message in [
        (["one"], "2 images but 1 texts: pairs go by position, so the inputs' shapes must be equal (an empty element "
                  "marks a pair's missing side)"),
        (["one", " "], "pair 1 has neither an image nor a text: send at least one side"),
    ]:
        body, headers = _binary_request({"inputs": [image_input, {**TEXT, "shape": [len(texts)], "data": texts}]}, images)
        response = http.post("/v2/models/tiny-fusion/infer", content=body, headers=headers)
        assert (response.status_code, response.json()) == (400, {"error": message})


def test_bodies_beyond_the_limit_and_compressed_bodies_are_refused(http: httpx.Client) -> None:
    big = json.dumps({"inputs": [_text_input(data=["x" * 100_001])]}).encode()
    response = http.post("/v2/models/tiny-text/infer", content=big)
    assert (response.status_code, response.json()) == (
        413, {"error": "request body is larger than the limit of 100,000 bytes (MAX_JSON_BYTES)"})
    zipped = gzip.compress(json.dumps({"inputs": [TEXT]}).encode())
    response = http.post("/v2/models/tiny-text/infer", content=zipped, headers={"Content-Encoding": "gzip"})
    assert (response.status_code, response.json()) == (
        415, {"error": "compressed request bodies ('gzip') are not accepted; send it uncompressed"})


def test_binary_images_larger_than_the_json_limit_are_answered(http: httpx.Client) -> None:
    """The body rule of inference is the upload limit (images travel in it); its JSON header keeps the JSON limit."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    png = encode(Image.fromarray(noise), "PNG")  # about 270 kB: over MAX_JSON_BYTES (100,000 here)
    assert len(png) > 100_000
    body, headers = _binary_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                 "parameters": {"binary_data_size": len(png) + 4}}]},
                                    _bytes_tensor([png]))
    response = http.post("/v2/models/tiny-lenet/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1, 10]


def test_chunked_json_bodies_keep_the_json_limit(http: httpx.Client) -> None:
    big = json.dumps({"inputs": [_text_input(data=["x" * 100_001])]}).encode()
    response = http.post("/v2/models/tiny-text/infer", content=iter([big[:50_000], big[50_000:]]))
    assert (response.status_code, response.json()) == (
        413, {"error": "request body is larger than the limit of 100,000 bytes (MAX_JSON_BYTES)"})


@pytest.mark.parametrize(("body", "message"), [
    (b"", "the request body is empty: send an inference request (JSON with 'inputs')"),
    (b"{not json", "the inference request is not valid JSON (UTF-8)"),
    (b'{"inputs": [1e999999]}', "each input must be a JSON object"),
    (b"\xff\xfe{}", "the inference request is not valid JSON (UTF-8)"),
])
def test_malformed_bodies_are_refused(http: httpx.Client, body: bytes, message: str) -> None:
    response = http.post("/v2/models/tiny-text/infer", content=body)
    assert (response.status_code, response.json()) == (400, {"error": message})


def _head_only(server: Server, head: str) -> tuple[int, dict]:
    """Send only a request's head (the body never comes) and read the answer: it must not wait for the body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize(("length_headers", "status", "message"), [
    ("Content-Length: 50\r\nInference-Header-Content-Length: 60", 400,
     "the Inference-Header-Content-Length header says 60 bytes of JSON, but the body has 50 bytes"),
    ("Transfer-Encoding: chunked\r\nInference-Header-Content-Length: 100001", 413,
     "the JSON header is larger than the limit of 100,000 bytes (MAX_JSON_BYTES)"),
])
def test_header_lengths_are_refused_before_the_body_is_read(v2_server: Server, length_headers, status, message) -> None:
    head = (f"POST /v2/models/tiny-text/infer HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n{length_headers}\r\n"
            "Connection: close\r\n\r\n")
    assert _head_only(v2_server, head) == (status, {"error": message})


@pytest.mark.parametrize(("status", "body", "expected"), [
    (422, b'{"detail": "texts: field required", "errors": []}', (400, {"error": "texts: field required"})),
    (413, b'{"detail": "too large"}', (413, {"error": "too large"})),
    (500, b"Internal Server Error", (500, {"error": "Internal Server Error"})),
    (503, b'{"ready": false}', (503, {"ready": False})),  # a body of the route's own shape stays
])
def test_protocol_errors_take_the_v2_shape(status: int, body: bytes, expected: tuple[int, dict]) -> None:
    from app.errors import protocol_error

    answered, rewritten = protocol_error(status, body)
    assert (answered, json.loads(rewritten)) == expected


def test_ready_probe_is_503_until_the_models_are_ready() -> None:
    import asyncio
    import types

    from app.routes.v2 import server_ready

    response = asyncio.run(server_ready(types.SimpleNamespace(phase="starting", registry=None)))
    assert (response.status_code, json.loads(response.body), response.headers["retry-after"]) == (503, {"ready": False}, "1")
