"""Prometheus metrics of the service (one process-wide set) and the ASGI middleware that counts requests.

Request metrics are labelled by route template (``/v1/models/{name}``), never by raw path, so a
client cannot grow the label set; a request answered before routing (401, 408, 413, 415, 503 from
``app.middleware``, or 404) is labelled ``/v1/*`` when its path is under ``/v1/``, else ``unmatched``.
Worker metrics separate time waiting in the queue from compute.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.middleware import route_path

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter("crossmodal_http_requests_total", "HTTP requests by route, method and status",
                   ["route", "method", "status"])
LATENCY = Histogram("crossmodal_http_request_duration_seconds", "HTTP request latency", ["route"],
                    buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("crossmodal_http_requests_in_flight", "HTTP requests being answered")
PREPROCESS = Histogram("crossmodal_preprocess_seconds", "time to decode or tokenise one request's inputs",
                       ["model"], buckets=_LATENCY_BUCKETS)
FROZEN_OBJECTS = Gauge("crossmodal_gc_frozen_objects",
                       "objects out of the cyclic collector's reach (app.lifecycle.freeze_heap)")
QUEUE_DEPTH = Gauge("crossmodal_queue_depth", "items waiting for the inference worker")
QUEUE_WAIT = Histogram("crossmodal_queue_wait_seconds", "time an item waits before its batch starts", ["model"],
                       buckets=_LATENCY_BUCKETS)
COMPUTE = Histogram("crossmodal_batch_compute_seconds", "time to run one batch (collate, forward, softmax)",
                    ["model"], buckets=_LATENCY_BUCKETS)
BATCH_SIZE = Histogram("crossmodal_batch_size", "items per batch run by the worker", ["model"],
                       buckets=_BATCH_BUCKETS)
ITEMS = Counter("crossmodal_items_total", "items answered by the worker, by outcome", ["model", "outcome"])
TOKENIZER_RESTARTS = Counter("crossmodal_tokenizer_restarts_total",
                             "tokenizer processes killed and replaced after a batch took too long or they died")
MODEL_RELOADS = Counter("crossmodal_model_reloads_total", "model directories loaded, unloaded or failed to load "
                        "while serving (SIGHUP, /admin)", ["directory", "outcome"])
TEXTS_TOKENISED = Counter("crossmodal_texts_tokenised_total", "texts tokenised, by where (process or thread)",
                          ["where"])

UNCOUNTED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
API_PREFIX = "/v1/"


def route_label(scope: Scope) -> str:
    """The request's route template, or for a request no route answered, ``/v1/*`` or ``unmatched``."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return str(template)
    return API_PREFIX + "*" if route_path(scope).startswith(API_PREFIX) else "unmatched"


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST


class InFlight:
    """Work requests (not health, readiness or metrics) being answered: what a drain waits for."""

    def __init__(self) -> None:
        self.count = 0


class MetricsMiddleware:
    """Counts requests by route and status, times them, and tracks in-flight work requests."""

    def __init__(self, app: ASGIApp, in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = route_path(scope) not in UNCOUNTED_PATHS
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        if counted:
            self.in_flight.count += 1
            IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            if counted:
                self.in_flight.count -= 1
                IN_FLIGHT.dec()
            route = route_label(scope)
            REQUESTS.labels(route, scope["method"], str(status)).inc()
            LATENCY.labels(route).observe(time.perf_counter() - started)
