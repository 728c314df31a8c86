"""Liveness, readiness and Prometheus metrics: open to everyone, never behind an API key."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app import metrics
from app.lifecycle import READY
from app.routes.deps import ServiceDep
from app.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="alive")


@router.get("/readyz", response_model=Readiness, summary="Models loaded and warmed up (503 while starting or draining)",
            responses={503: {"model": Readiness, "description": "starting, draining or failed"}})
async def readyz(service: ServiceDep) -> Response:
    if service.phase == READY and service.registry is not None:
        body = Readiness(status=READY, models=[model.name for model in service.registry.models])
        return JSONResponse(body.model_dump())
    body = Readiness(status=service.phase, detail=service.error)
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
