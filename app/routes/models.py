"""The loaded models: what they are, what they expect, where they came from."""

from __future__ import annotations

from fastapi import APIRouter, Path

from app.openapi import error_responses
from app.registry import ModelRegistry, ServedModel
from app.routes.deps import ServiceDep, VersionQuery
from app.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


def _info(served: ServedModel, registry: ModelRegistry) -> ModelInfo:
    return ModelInfo(**served.describe(), versions=list(registry.entry(served.name).versions),
                     default=registry.defaults.get(served.task) == served.name)


@router.get("", response_model=ModelList, summary="List the loaded models", responses=error_responses(401, 503))
async def list_models(service: ServiceDep) -> ModelList:
    registry, _ = service.ready()
    return ModelList(models=[_info(entry.served, registry) for entry in registry.entries], defaults=registry.defaults)


@router.get("/{name}", response_model=ModelInfo, summary="Describe one model (one version of it)",
            responses=error_responses(401, 404, 422, 503))
async def get_model(service: ServiceDep, name: str = Path(max_length=200), version: VersionQuery = None) -> ModelInfo:
    registry, _ = service.ready()
    return _info(registry.get(name, version), registry)
