"""What the routers share: the service, the API-key check, limits, and turning probabilities into predictions."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from fastapi import Depends, Query, Request, Response, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app import metrics
from app.errors import InvalidInput, Unauthorized
from app.lifecycle import Service
from app.registry import ServedModel
from app.schemas import ClassifyResponse, ErrorBody, ModelRef, Prediction, TopK

_bearer = HTTPBearer(auto_error=False, description="an API key, when the server sets API_KEYS")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key (alternative to Bearer)")


async def get_service(request: Request) -> Service:  # async: no thread hop per request
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_api_key(
    request: Request,
    service: ServiceDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_api_key_header)],
) -> None:
    keys = service.settings.api_key_set
    if not keys:
        return
    if bearer is None and request.headers.get("authorization"):
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    supplied = bearer.credentials if bearer is not None else header_key
    if not supplied:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if not any(hmac.compare_digest(supplied.encode(), key.encode()) for key in keys):
        raise Unauthorized("the API key is not valid")


ModelQuery = Annotated[str | None, Query(description="model name (see /v1/models); default: the task's default model",
                                         max_length=200)]
TopKQuery = Annotated[int, Query(ge=1, le=1000, description="how many of the most probable classes to list "
                                                            "(at most the model's number of classes)")]


def check_item_count(count: int, service: Service, what: str) -> None:
    limit = service.settings.max_items_per_request
    if count == 0:
        raise InvalidInput(f"no {what} in the request")
    if count > limit:
        raise InvalidInput(f"too many {what}: {count} (at most {limit} per request, MAX_ITEMS_PER_REQUEST)")


def check_unicode(text: str, name: str) -> None:
    """422 for a lone surrogate: JSON lets a client escape one (``"\\ud800"``), and no tokenizer can
    encode it (spaCy raised UnicodeEncodeError: a 500 before this check)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidInput(f"{name} is not valid Unicode: a lone surrogate (U+{ord(text[error.start]):04X}) at "
                           f"character {error.start}") from None


async def classify(
    request: Request, service: Service, served: ServedModel, inputs: Sequence[Any], names: Sequence[str], top_k: int
) -> Response:
    """Prepare ``inputs`` off the event loop, run them through the worker, answer with predictions."""
    _, worker = service.ready()
    deadline = asyncio.get_running_loop().time() + service.settings.request_timeout
    worker.check_capacity(len(inputs))  # refuse early, before spending time on decoding
    started = time.perf_counter()
    with worker.preparing():
        payloads = await served.runner.prepare_async(inputs, names, service.run_blocking)
    metrics.PREPROCESS.labels(served.name).observe(time.perf_counter() - started)
    probabilities = await worker.submit(served, payloads, deadline)
    body = ClassifyResponse(
        model=ModelRef(name=served.name, version=served.manifest.version, task=served.task),
        predictions=[to_prediction(row, served.classes, top_k) for row in probabilities],
        request_id=request_id(request),
    )
    # Serialised here, once: returned as a model, FastAPI would validate it against response_model
    # again and encode it in two steps; the route's response_model still documents it.
    return Response(body.model_dump_json(), media_type="application/json")


def to_prediction(probabilities: torch.Tensor, classes: list[str], top_k: int) -> Prediction:
    values = probabilities.tolist()  # (classes,)
    order = sorted(range(len(values)), key=lambda index: -values[index])[: min(top_k, len(values))]
    best = order[0]
    return Prediction(
        label=classes[best], probability=values[best],
        top_k=[TopK(label=classes[i], probability=values[i]) for i in order],
        probabilities=dict(zip(classes, values, strict=True)),
    )


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the listed error statuses (all answer ``{"detail": ...}``)."""
    return {status: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


_ERROR_DESCRIPTIONS = {
    400: "undecodable or truncated image",
    401: "missing or invalid API key (only when API_KEYS is set)",
    404: "unknown model, or a model of another task",
    413: "request body or image too large",
    415: "unsupported image format",
    422: "invalid request: bad parameters, malformed JSON, empty, too long or too many inputs",
    503: "starting, shutting down, or overloaded (see Retry-After)",
    504: "no result within the request deadline",
}
