"""The ASGI app, ``app.main:app`` (launched by ``python -m app.serve``). Builds the FastAPI app from the settings."""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI
from fastapi.telemetry import TelemetryConfig

from app.docs import install_docs
from app.errors import ProtocolErrorMiddleware, install_error_handlers
from app.lifecycle import Service, lifespan
from app.metrics import MetricsMiddleware
from app.middleware import ApiKeyMiddleware, BodyLimitMiddleware, BodyRule, ConcurrencyLimitMiddleware, RequestIdMiddleware
from app.openapi import install_openapi
from app.routes import admin, health, image, models, multimodal, page, text, v2
from app.routes.deps import require_api_key
from app.routes.guarded import body_rules
from app.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("app").setLevel(settings.log_level.upper())
    service = Service(settings)
    telemetry = None if settings.opentelemetry else TelemetryConfig(tracing=False, metrics=False, logs=False,
                                                                    operation_spans=False)
    app = FastAPI(title="crossmodal", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, telemetry=telemetry,
                  description="Calibrated image, text and image + text (multimodal) classification, dynamically batched "
                              "on one worker per device.")
    app.state.service = service
    app.include_router(health.router)  # health, readiness and metrics stay open
    app.include_router(v2.probes)  # so do the Open Inference Protocol's probes
    # The API-key check guards /v1 only when keys are set: FastAPI resolves a dependency and its
    # security schemes on every request, even to let it through, and without keys OpenAPI asks for none.
    guard = [Depends(require_api_key)] if settings.api_key_set else []
    for router in (models.router, image.router, text.router, multimodal.router, v2.router):
        app.include_router(router, dependencies=guard)
    if settings.admin_token_value:  # otherwise not served at all: /admin/... is a 404 like any unknown path
        app.include_router(admin.router)
    install_error_handlers(app)
    install_openapi(app)
    install_docs(app)
    app.include_router(page.router)  # the page for people (GET /): open; the API calls it makes are guarded
    app.add_middleware(BodyLimitMiddleware, default=BodyRule(settings.max_json_bytes, "MAX_JSON_BYTES"),
                       rules={**body_rules(app.routes, settings), **v2.body_rules(settings)}, body_timeout=settings.body_timeout)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_set)  # before the body rules: 401 reads nothing
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_set, prefix="/v2/models/")  # GET /v2 has the guard only
    app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.max_connections,  # first refusal; probes exempt
                       exempt=frozenset({"/healthz", "/readyz", *v2.PROBE_PATHS}))
    app.add_middleware(ProtocolErrorMiddleware, prefix="/v2")  # /v2 errors as {"error": …}, the refusals above too
    app.add_middleware(MetricsMiddleware, in_flight=service.in_flight)
    app.add_middleware(RequestIdMiddleware)
    return app


app = create_app()
