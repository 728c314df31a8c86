"""Liveness, readiness and Prometheus metrics: open to everyone, never behind an API key."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app import metrics
from app.errors import scrub_paths
from app.lifecycle import READY
from app.routes.deps import ServiceDep
from app.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


def public_reason(error: str, limit: int = 200) -> str:
    """A load error as anyone may read it: its first line, no file paths, not too long (the service
    log holds the whole error and its traceback)."""
    first = scrub_paths(error.strip().splitlines()[0]) if error.strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="alive")


@router.get("/readyz", response_model=Readiness, summary="Models loaded and warmed up (503 while starting or draining)",
            responses={503: {"model": Readiness, "description": "starting, draining or failed"}})
async def readyz(service: ServiceDep) -> Response:
    if service.phase == READY and service.registry is not None:
        body = Readiness(status=READY, models=service.registry.names)
        return JSONResponse(body.model_dump())
    body = Readiness(status=service.phase, detail=public_reason(service.error))
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
