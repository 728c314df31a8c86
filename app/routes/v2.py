"""The Open Inference Protocol v2 (KServe v2 REST) beside /v1: health, metadata and inference of every loaded model.

Each model takes BYTES tensors of shape ``[N]``: ``image`` (encoded images) for image models,
``text`` (UTF-8) for text models, both for multimodal models (pair ``i`` is element ``i`` of each; an
empty element means that pair lacks that side, an omitted input that every pair does). It answers
``probabilities``: FP32 ``[N, classes]``, the calibrated distributions /v1 gives, classes in the
model's order (``parameters.classes`` of the model's metadata). Extensions: binary tensor data (BYTES
elements length-prefixed, 4 bytes little-endian; outputs in binary when asked) and classification
(``"value:index:label"`` strings, the top k of each item).

An inference request goes the /v1 way (``app.pipeline.predict``: admission, deadline, batching, the same
decoding and tokenising limits). Before any of it, cheap refusals in order: the model; the binary
layout (the ``Inference-Header-Content-Length`` within the body and ``MAX_JSON_BYTES``); the JSON
header parsed within a budget of values; names, datatypes, shapes and item counts; binary sizes that
sum exactly to the bytes after the header; then each element. Errors are ``{"error": message}``
(``app.errors.ProtocolErrorMiddleware``), invalid input 400.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.errors import InvalidInput, PayloadTooLarge, UnsupportedFormat
from app.lifecycle import READY, Service
from app.middleware import BodyRule
from app.pipeline import predict
from app.registry import ServedModel
from app.routes.deps import ServiceDep
from app.routes.guarded import BoundedParser, JsonTooCostly
from app.routes.limits import check_item_count, checked_text
from app.settings import Settings
from app.tasks import Pair

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
probes = APIRouter(prefix="/v2/health", tags=["operations"])  # open to everyone, like /healthz
PROBE_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def body_rules(settings: Settings) -> dict[str, BodyRule]:
    """An inference body may carry encoded images (binary tensor data extension): up to the upload limit,
    of any content type (clients differ; the JSON header inside is checked on its own, ``header_length``)."""
    rule = BodyRule(settings.max_upload_bytes, "MAX_UPLOAD_BYTES")
    return {"/v2/models/{name}/infer": rule, "/v2/models/{name}/versions/{version}/infer": rule}

OUTPUT = "probabilities"
TASK_INPUTS = {"image": ("image",), "text": ("text",), "multimodal": ("image", "text")}
HEADER_LENGTH = "inference-header-content-length"
MAX_ID_CHARS = 256
REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})


class ProtocolError(BaseModel):
    error: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="task, architecture and `classes`: the output's columns, in order")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` when the data follows in binary")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


_ERRORS = {
    400: "invalid request: malformed header, unknown or duplicate input, wrong datatype or shape, bad element",
    401: "missing or invalid API key (only when API_KEYS is set)",
    404: "unknown model, or a version the model does not have",
    408: "the request body did not arrive within BODY_TIMEOUT",
    413: "request body or image too large",
    415: "unsupported image format, or a compressed request body",
    503: "starting, shutting down, or overloaded (see Retry-After)",
    504: "no result within the request deadline",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ProtocolError, "description": _ERRORS[status]} for status in statuses}


ModelName = Annotated[str, Path(max_length=200, description="the model's name (GET /v1/models lists them)")]
ModelVersion = Annotated[str, Path(max_length=128, description="one of the model's versions (its metadata lists them)")]


def resolve(service: Service, name: str, version: str | None = None) -> ServedModel:
    """The loaded model ``name`` at ``version`` (without one: its default version)."""
    registry, _ = service.ready()
    return registry.get(name, version)


# ---- health and metadata ------------------------------------------------------------------------


@probes.get("/live", summary="The process is alive (Open Inference Protocol)")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@probes.get("/ready", summary="Models loaded and warmed up (503 while starting or draining)",
            responses={503: {"description": "starting, draining or failed"}})
async def server_ready(service: ServiceDep) -> Response:
    ready = service.phase == READY and service.registry is not None
    return JSONResponse({"ready": ready}, 200 if ready else 503, headers=None if ready else {"Retry-After": "1"})


@router.get("", response_model=ServerMetadata, summary="Server metadata", responses=_errors(401))
async def server_metadata() -> ServerMetadata:
    try:
        version = importlib.metadata.version("crossmodal")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return ServerMetadata(name="crossmodal", version=version, extensions=["binary_tensor_data", "classification"])


def _metadata(service: Service, served: ServedModel) -> ModelMetadata:
    registry, _ = service.ready()
    return ModelMetadata(
        name=served.name, versions=list(registry.entry(served.name).versions), platform="pytorch",
        inputs=[TensorMetadata(name=name, datatype="BYTES", shape=[-1]) for name in TASK_INPUTS[served.task]],
        outputs=[TensorMetadata(name=OUTPUT, datatype="FP32", shape=[-1, len(served.classes)])],
        parameters={"task": served.task, "architecture": served.manifest.architecture, "classes": served.classes},
    )


@router.get("/models/{name}", response_model=ModelMetadata, summary="Model metadata",
            responses=_errors(400, 401, 404, 503))
async def model_metadata(service: ServiceDep, name: ModelName) -> ModelMetadata:
    return _metadata(service, resolve(service, name))


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, summary="Model metadata (one version)",
            responses=_errors(400, 401, 404, 503))
async def model_version_metadata(service: ServiceDep, name: ModelName, version: ModelVersion) -> ModelMetadata:
    return _metadata(service, resolve(service, name, version))


@router.get("/models/{name}/ready", summary="Model ready", responses=_errors(400, 401, 404, 503))
async def model_ready(service: ServiceDep, name: ModelName) -> dict[str, Any]:
    return {"name": resolve(service, name).name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", summary="Model ready (one version)",
            responses=_errors(400, 401, 404, 503))
async def model_version_ready(service: ServiceDep, name: ModelName, version: ModelVersion) -> dict[str, Any]:
    return {"name": resolve(service, name, version).name, "ready": True}


# ---- inference ----------------------------------------------------------------------------------


@dataclasses.dataclass
class InputTensor:
    name: str
    count: int  # N of shape [N]
    binary_size: int | None  # bytes after the JSON header, or None: the elements are in ``data``
    data: list[Any] | None


@dataclasses.dataclass
class OutputRequest:
    binary: bool
    classification: int  # the top k as "value:index:label"; 0: the probabilities themselves


def header_length(request: Request, max_header: int) -> int | None:
    """The JSON header's length from ``Inference-Header-Content-Length`` (binary tensor data extension),
    checked against the declared body and ``max_header`` before the body is read; None: all JSON."""
    value = request.headers.get(HEADER_LENGTH)
    if value is None:  # all JSON: the body rule allows uploads' size for binary data, JSON gets its own limit
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_header:
            raise PayloadTooLarge(_json_too_large(max_header))
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 18) or int(value) == 0:  # within int64
        raise InvalidInput("the Inference-Header-Content-Length header must be the JSON header's length in bytes")
    length, declared = int(value), request.headers.get("content-length", "")
    if declared.isdigit() and length > int(declared):
        raise InvalidInput(f"the Inference-Header-Content-Length header says {length:,} bytes of JSON, but the body "
                           f"has {int(declared):,} bytes")
    if length > max_header:
        raise PayloadTooLarge(f"the JSON header is larger than the limit of {max_header:,} bytes (MAX_JSON_BYTES)")
    return length


def _json_too_large(limit: int) -> str:
    return f"request body is larger than the limit of {limit:,} bytes (MAX_JSON_BYTES)"


def split_body(body: bytes, length: int | None, max_header: int) -> tuple[bytes, memoryview]:
    """The JSON header and the binary data after it."""
    if length is None:
        if len(body) > max_header:  # chunked, so its size was not known before reading
            raise PayloadTooLarge(_json_too_large(max_header))
        return body, memoryview(b"")
    if length > len(body):
        raise InvalidInput(f"the Inference-Header-Content-Length header says {length:,} bytes of JSON, but the body "
                           f"has {len(body):,} bytes")
    return body[:length], memoryview(body)[length:]


def parse_header(header: bytes, max_items: int) -> dict[str, Any]:
    """The JSON inference request, parsed within a budget of values: a request of ``max_items`` items
    in two inputs needs a few hundred; a header of a million tiny values costs as much."""
    try:
        value = BoundedParser(budget=128 + 4 * max_items, max_depth=6).parse(header.decode("utf-8"))
    except JsonTooCostly:
        raise InvalidInput(f"the inference request holds too many JSON values, or nests them too deeply, for a "
                           f"request of at most {max_items} items (MAX_ITEMS_PER_REQUEST)") from None
    except (ValueError, RecursionError):
        raise InvalidInput("the inference request is not valid JSON (UTF-8)") from None
    if not isinstance(value, dict):
        raise InvalidInput("the inference request must be a JSON object with 'inputs'")
    unknown = sorted(set(value) - REQUEST_KEYS)
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0][:40]!r} in the inference request; it takes "
                           "'id', 'parameters', 'inputs' and 'outputs'")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_inputs(request: dict[str, Any], served: ServedModel, service: Service) -> list[InputTensor]:
    """The request's input tensors, checked against the model's: names, datatype, shape, item count, layout."""
    expected = TASK_INPUTS[served.task]
    takes = " and ".join(repr(name) for name in expected)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput(f"the inference request needs 'inputs': a list of tensors; model {served.name!r} takes {takes}")
    if len(inputs) > len(expected):
        raise InvalidInput(f"{len(inputs)} inputs; model {served.name!r} takes {takes}")
    tensors: list[InputTensor] = []
    for raw in inputs:
        tensor = _object(raw, "each input")
        name = tensor.get("name")
        if name not in expected:
            shown = repr(name[:40]) if isinstance(name, str) else "without a name"
            raise InvalidInput(f"unknown input {shown}; model {served.name!r} takes {takes}")
        if any(seen.name == name for seen in tensors):
            raise InvalidInput(f"input {name!r} is given twice")
        if tensor.get("datatype") != "BYTES":
            raise InvalidInput(f"input {name!r}: datatype must be 'BYTES', not {str(tensor.get('datatype'))[:20]!r}")
        shape = tensor.get("shape")
        if not (isinstance(shape, list) and len(shape) == 1 and _whole(shape[0]) and 0 <= shape[0] < 2**63):
            raise InvalidInput(f"input {name!r}: shape must be [N], N items, not {str(shape)[:40]}")
        check_item_count(shape[0], service, f"elements in input {name!r}")
        parameters = _object(tensor.get("parameters"), f"input {name!r}: parameters")
        if any(key.startswith("shared_memory") for key in parameters):
            raise InvalidInput(f"input {name!r}: shared memory is not supported; send the data in the request")
        size, data = parameters.get("binary_data_size"), tensor.get("data")
        if size is not None:
            if not _whole(size) or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be a whole number of bytes")
            if data is not None:
                raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size; send one")
        elif name == "image":
            raise InvalidInput("input 'image': send images as binary data (binary tensor data extension, "
                               "parameters.binary_data_size); JSON cannot carry their bytes")
        elif not isinstance(data, list) or len(data) != shape[0] or not all(isinstance(item, str) for item in data):
            raise InvalidInput(f"input {name!r}: 'data' must be a flat list of {shape[0]} strings, as its shape says")
        tensors.append(InputTensor(name, shape[0], size, data))
    return tensors


def read_output(request: dict[str, Any]) -> OutputRequest:
    """What the client asked of ``probabilities``: binary or JSON, raw or classified."""
    parameters = _object(request.get("parameters"), "the request's parameters")
    binary = parameters.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise InvalidInput("parameters.binary_data_output must be true or false")
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput(f"'outputs' must be a list of requested outputs (this model has one, {OUTPUT!r})")
    if len(outputs) > 1:
        raise InvalidInput(f"{len(outputs)} outputs requested; this model has one, {OUTPUT!r}")
    if not outputs:
        return OutputRequest(binary, 0)
    output = _object(outputs[0], "each requested output")
    if output.get("name") != OUTPUT:
        shown = repr(output["name"][:40]) if isinstance(output.get("name"), str) else "without a name"
        raise InvalidInput(f"unknown output {shown}; this model has one, {OUTPUT!r}")
    parameters = _object(output.get("parameters"), f"output {OUTPUT!r}: parameters")
    if any(key.startswith("shared_memory") for key in parameters):
        raise InvalidInput(f"output {OUTPUT!r}: shared memory is not supported")
    binary = parameters.get("binary_data", binary)
    classification = parameters.get("classification", 0)
    if not isinstance(binary, bool):
        raise InvalidInput(f"output {OUTPUT!r}: binary_data must be true or false")
    if not _whole(classification) or classification < 0:
        raise InvalidInput(f"output {OUTPUT!r}: classification must be a whole number of classes (0: none)")
    return OutputRequest(binary, classification)


def read_elements(tensor: InputTensor, binary: memoryview) -> list[bytes]:
    """The tensor's BYTES elements from its binary data: each a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    for index in range(tensor.count):
        if offset + 4 > len(binary):
            raise InvalidInput(f"input {tensor.name!r}: the binary data ends before element {index} of {tensor.count}")
        length = int.from_bytes(binary[offset:offset + 4], "little")
        offset += 4
        if offset + length > len(binary):
            raise InvalidInput(f"input {tensor.name!r}: element {index} says {length:,} bytes, but only "
                               f"{len(binary) - offset:,} are left in its binary data")
        elements.append(bytes(binary[offset:offset + length]))
        offset += length
    if offset != len(binary):
        raise InvalidInput(f"input {tensor.name!r}: {len(binary) - offset:,} bytes left after its {tensor.count} "
                           "elements (binary_data_size must be exactly their length)")
    return elements


def read_tensor_data(tensors: list[InputTensor], binary: memoryview) -> dict[str, list[Any]]:
    """Each tensor's elements: the binary sizes must add up to exactly the bytes after the header."""
    expected = sum(tensor.binary_size or 0 for tensor in tensors)
    if expected != len(binary):
        raise InvalidInput(f"the inputs' binary_data_size add up to {expected:,} bytes, but {len(binary):,} follow "
                           "the JSON header (Inference-Header-Content-Length)")
    elements: dict[str, list[Any]] = {}
    offset = 0
    for tensor in tensors:
        if tensor.binary_size is None:
            elements[tensor.name] = list(tensor.data or [])
            continue
        elements[tensor.name] = read_elements(tensor, binary[offset:offset + tensor.binary_size])
        offset += tensor.binary_size
    return elements


def _text(value: str | bytes, name: str, limit: int, required: bool) -> str | None:
    """A text element checked as /v1 checks texts; None for an empty one when ``required`` is false."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInput(f"{name} is not valid UTF-8 (at byte {error.start})") from None
    return checked_text(value, name, limit, required)


def model_inputs(served: ServedModel, elements: dict[str, list[Any]], limit: int) -> tuple[list[Any], list[str]]:
    """The elements as the model's runner takes them (image bytes, texts or pairs), and their names."""
    if served.task == "image":
        images = elements["image"]
        return images, [f"image {index}" for index in range(len(images))]
    if served.task == "text":
        texts = elements["text"]
        return [_text(text, f"text {index}", limit, True) for index, text in enumerate(texts)], [
            f"text {index}" for index in range(len(texts))]
    count = max(len(side) for side in elements.values())
    if any(len(side) != count for side in elements.values()):
        raise InvalidInput(f"{len(elements['image'])} images but {len(elements['text'])} texts: pairs go by position, "
                           "so the inputs' shapes must be equal (an empty element marks a pair's missing side)")
    images = [image or None for image in elements.get("image", [None] * count)]
    texts = [None if text is None else _text(text, f"pair {index}: the text", limit, False)
             for index, text in enumerate(elements.get("text", [None] * count))]
    pairs = [Pair(image, text) for image, text in zip(images, texts, strict=True)]
    for index, pair in enumerate(pairs):
        if pair.image is None and pair.text is None:
            raise InvalidInput(f"pair {index} has neither an image nor a text: send at least one side")
    return pairs, [f"pair {index}" for index in range(count)]


def encode_response(served: ServedModel, request_id: Any, probabilities: torch.Tensor, wanted: OutputRequest) -> Response:
    """The inference response; with binary output, the JSON header then the output's bytes."""
    count = len(probabilities)  # probabilities: (N, classes) float32
    output: dict[str, Any] = {"name": OUTPUT}
    raw: bytes
    if wanted.classification:
        k = min(wanted.classification, probabilities.shape[1])
        values, indices = torch.sort(probabilities, dim=1, descending=True, stable=True)  # ties: lower index first
        labels = [f"{np.float32(value)}:{index}:{served.classes[index]}"
                  for row_values, row_indices in zip(values[:, :k].tolist(), indices[:, :k].tolist(), strict=True)
                  for value, index in zip(row_values, row_indices, strict=True)]
        output.update(datatype="BYTES", shape=[count, k])
        raw = b"".join(len(encoded).to_bytes(4, "little") + encoded for encoded in (s.encode() for s in labels))
        data: list[Any] = labels
    else:
        output.update(datatype="FP32", shape=list(probabilities.shape))
        raw = probabilities.numpy().astype("<f4").tobytes()
        data = probabilities.flatten().tolist()
    if wanted.binary:
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = data
    body: dict[str, Any] = {"model_name": served.name, "model_version": served.version}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = [output]
    header = json.dumps(body, separators=(",", ":")).encode()
    if not wanted.binary:
        return Response(header, media_type="application/json")
    return Response(header + raw, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


_INFER_DESCRIPTION = """\
An Open Inference Protocol inference request: BYTES inputs of shape `[N]` (`image`: encoded images, in binary;
`text`: UTF-8 texts, in JSON `data` or in binary), answered with `probabilities`, FP32 `[N, classes]`. With the
binary tensor data extension the body is the JSON header (its length in the `Inference-Header-Content-Length`
header) followed by each binary input's elements, each a 4-byte little-endian length and then its bytes. See
docs/api-v2.md.
"""

_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {
        "schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string", "maxLength": MAX_ID_CHARS},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                "type": "object", "required": ["name", "datatype", "shape"], "properties": {
                    "name": {"type": "string", "enum": ["image", "text"]},
                    "datatype": {"type": "string", "enum": ["BYTES"]},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 1},
                    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
                    "data": {"type": "array", "items": {"type": "string"}}}}},
            "outputs": {"type": "array", "maxItems": 1, "items": {
                "type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string", "enum": [OUTPUT]},
                    "parameters": {"type": "object", "properties": {
                        "binary_data": {"type": "boolean"}, "classification": {"type": "integer", "minimum": 0}}}}}}}},
        "example": {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                "data": ["The goalie made 40 saves in the playoff game last night."]}],
                    "outputs": [{"name": OUTPUT, "parameters": {"classification": 2}}]}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}

_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "description": "JSON, or with binary output the JSON header (Inference-Header-Content-Length) then its bytes"},
    **_errors(400, 401, 404, 408, 413, 415, 503, 504),
}


async def _infer(request: Request, service: Service, served: ServedModel) -> Response:
    settings = service.settings
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedFormat(f"compressed request bodies ({encoding[:20]!r}) are not accepted; send it uncompressed")
    length = header_length(request, settings.max_json_bytes)
    header, binary = split_body(await request.body(), length, settings.max_json_bytes)
    if not header.strip():
        raise InvalidInput("the request body is empty: send an inference request (JSON with 'inputs')")
    parsed = parse_header(header, settings.max_items_per_request)
    request_id = parsed.get("id")
    if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS):
        raise InvalidInput(f"'id' must be a string of at most {MAX_ID_CHARS} characters")
    tensors = read_inputs(parsed, served, service)
    wanted = read_output(parsed)
    elements = read_tensor_data(tensors, binary)
    inputs, names = model_inputs(served, elements, settings.max_text_chars)
    probabilities = await predict(request, service, served, inputs, names)
    if probabilities is None:
        return Response(status_code=499)  # nobody is listening; the status only shows in logs and metrics
    return encode_response(served, request_id, torch.stack(probabilities), wanted)


@router.post("/models/{name}/infer", summary="Classify (Open Inference Protocol)", description=_INFER_DESCRIPTION,
             response_model=InferResponse, responses=_INFER_RESPONSES, openapi_extra={"requestBody": _REQUEST_BODY})
async def infer(request: Request, service: ServiceDep, name: ModelName) -> Response:
    return await _infer(request, service, resolve(service, name))


@router.post("/models/{name}/versions/{version}/infer", summary="Classify with one model version",
             description=_INFER_DESCRIPTION, response_model=InferResponse, responses=_INFER_RESPONSES,
             openapi_extra={"requestBody": _REQUEST_BODY})
async def infer_version(request: Request, service: ServiceDep, name: ModelName, version: ModelVersion) -> Response:
    return await _infer(request, service, resolve(service, name, version))
