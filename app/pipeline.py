"""One inference request's path, stage by stage, shared by /v1 and /v2.

admit (``MAX_QUEUE``, before any work) → prepare (the runner decodes images or tokenises texts off
the event loop, within the request's deadline) → batch and forward (the inference worker, across
clients) → calibrate (the runner: its checkpoint's calibration map) → postprocess (``to_prediction``:
label, top-k, every class) → encode (``classify``: the /v1 JSON body; /v2 encodes its own).
A client that goes away stops its request at whichever stage it has reached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import torch
from fastapi import Request, Response

from app import metrics
from app.errors import DeadlineExceeded
from app.lifecycle import Service
from app.registry import ServedModel
from app.schemas import ClassifyResponse, ModelRef, Prediction, TopK
from app.worker import Admission, InferenceWorker


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
