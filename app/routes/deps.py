"""What the routers share: the service, the API-key check, limits, and turning probabilities into predictions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from fastapi import Depends, Query, Request, Response, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app import metrics
from app.errors import DeadlineExceeded, InvalidInput, Unauthorized
from app.lifecycle import Service
from app.middleware import api_key_problem
from app.registry import ServedModel
from app.schemas import ClassifyResponse, ErrorBody, ModelRef, Prediction, TopK
from app.worker import Admission, InferenceWorker

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
    """The key check as FastAPI sees it: documents the security schemes in OpenAPI and checks again
    (``ApiKeyMiddleware`` has refused a bad key already, before the body was read)."""
    keys = service.settings.api_key_set
    if not keys:
        return
    problem = api_key_problem(request.headers.get("authorization", ""), header_key or "", keys)
    if problem is not None:
        raise Unauthorized(problem)


ModelQuery = Annotated[str | None, Query(description="model name (see /v1/models); default: the task's default model",
                                         max_length=200)]
VersionQuery = Annotated[str | None, Query(description="the model's version (see `versions` in /v1/models); default: "
                                                       "its default version", max_length=128)]
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


def checked_text(text: str, name: str, limit: int, required: bool = True) -> str | None:
    """A client's text as the text routes accept it: 422 when empty or only whitespace (or None where
    ``required`` is false), longer than ``limit`` (MAX_TEXT_CHARS) or not valid Unicode."""
    if not text.strip():
        if required:
            raise InvalidInput(f"{name} is empty or only whitespace")
        return None
    if len(text) > limit:
        raise InvalidInput(f"{name} has {len(text):,} characters; at most {limit:,} are accepted (MAX_TEXT_CHARS)")
    check_unicode(text, name)
    return text


async def classify(
    request: Request, service: Service, served: ServedModel, inputs: Sequence[Any], names: Sequence[str], top_k: int
) -> Response:
    """Prepare ``inputs`` off the event loop, run them through the worker, answer with predictions."""
    probabilities = await predict(request, service, served, inputs, names)
    if probabilities is None:
        return Response(status_code=499)  # nobody is listening; the status only shows in logs and metrics
    body = ClassifyResponse(
        model=ModelRef(name=served.name, version=served.version, task=served.task),
        predictions=[to_prediction(row, served.classes, top_k) for row in probabilities],
        request_id=request_id(request),
    )
    # Serialised here, once: returned as a model, FastAPI would validate it against response_model
    # again and encode it in two steps; the route's response_model still documents it.
    return Response(body.model_dump_json(), media_type="application/json")


async def predict(
    request: Request, service: Service, served: ServedModel, inputs: Sequence[Any], names: Sequence[str]
) -> list[torch.Tensor] | None:
    """The calibrated distribution of each of ``inputs`` ((classes,) each, in order), or None if the
    client went away first.

    The request counts against ``MAX_QUEUE`` from here until its items are in a batch; its deadline
    covers decoding and tokenising. If its client goes away meanwhile, the request stops waiting:
    its items are dropped before they reach a batch, and its texts before they reach a tokenizer
    process (unless they share a job with other requests); an image being decoded, or texts being
    tokenised, are finished unread."""
    _, worker = service.ready()
    deadline = asyncio.get_running_loop().time() + service.settings.request_timeout
    with worker.admit(len(inputs)) as admission:  # refuse early, before spending time on decoding
        work = asyncio.ensure_future(_prepare_and_run(service, served, worker, inputs, names, deadline, admission))
        work.add_done_callback(_retrieve)  # it may fail after it was given up
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # its queued items are skipped by the worker
        if not work.done() or work.cancelled():
            return None
        probabilities: list[torch.Tensor] = work.result()
    return probabilities


async def _prepare_and_run(service: Service, served: ServedModel, worker: InferenceWorker, inputs: Sequence[Any],
                           names: Sequence[str], deadline: float, admission: Admission) -> list[torch.Tensor]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout_at(deadline):
            payloads = await served.runner.prepare_async(inputs, names, service.run_blocking)
    except TimeoutError:
        raise DeadlineExceeded("the inputs could not be decoded or tokenised within the request deadline "
                               "(REQUEST_TIMEOUT); try again later, or with fewer or smaller inputs") from None
    metrics.PREPROCESS.labels(served.name).observe(time.perf_counter() - started)
    return await worker.submit(served, payloads, deadline, admission)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected (the body is read already: only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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
    404: "unknown model or version, or a model of another task",
    408: "the request body did not arrive within BODY_TIMEOUT",
    413: "request body, form field or image too large",
    415: "unsupported image format, or a body of another Content-Type than the route takes",
    422: "invalid request: bad parameters, malformed JSON, empty, too long or too many inputs",
    503: "starting, shutting down, or overloaded (see Retry-After)",
    504: "no result within the request deadline",
}
