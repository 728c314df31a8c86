"""Loading, reloading and unloading models while serving: mounted only when ``ADMIN_TOKEN`` is set.

Every route needs ``Authorization: Bearer <ADMIN_TOKEN>`` (not an API key; compared in constant
time): 401 without it, 403 with another. A model is named by its directory directly under
``MODEL_DIR`` (``app.repository.NAME``): never a path, a URL or an upload, and only the checkpoints
already there (safetensors weights and a manifest) are ever read. Not in the OpenAPI document: an
operator's tool, described in docs/lifecycle.md.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from app.errors import Conflict, Forbidden, InvalidInput, ModelNotFound, ServiceError, Unauthorized
from app.reloading import FAILED, UNCHANGED, NotLoaded
from app.repository import InvalidName, NotAModelDirectory, check_name
from app.routes.deps import ServiceDep
from models.checkpoint import CheckpointError


async def require_admin_token(request: Request, service: ServiceDep) -> None:
    token = service.settings.admin_token_value
    authorization = request.headers.get("authorization", "").strip()
    if not authorization:
        raise Unauthorized("the admin endpoints need 'Authorization: Bearer <ADMIN_TOKEN>'")
    scheme, _, supplied = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), token.encode()):
        raise Forbidden("the admin token is not valid")


router = APIRouter(prefix="/admin", tags=["admin"], include_in_schema=False,
                   dependencies=[Depends(require_admin_token)])

DirectoryName = Annotated[str, Path(max_length=256, description="a directory directly under MODEL_DIR")]


class LoadOutcome(BaseModel):
    directory: str
    outcome: str = Field(description="loaded, unloaded, unchanged or failed")
    model: str | None = Field(None, description="the model's name (from its manifests)")
    versions: list[str] = Field(description="its versions now loaded, oldest first")
    default_version: str | None = None
    reason: str | None = Field(None, description="why it failed, and what keeps serving")


class RescanReport(BaseModel):
    loaded: list[LoadOutcome]
    unloaded: list[LoadOutcome]
    failed: list[LoadOutcome]
    unchanged: list[str]


class LoadFailed(ServiceError):
    """The checkpoint could not be loaded (what served before still does)."""

    status_code = 422


def _checked(name: str) -> str:
    try:
        return check_name(name)
    except InvalidName as error:
        raise InvalidInput(str(error)) from None


@router.post("/models/{name}/load", response_model=LoadOutcome, summary="Load or reload one model directory")
async def load_model(service: ServiceDep, name: DirectoryName) -> LoadOutcome:
    try:
        outcome = await service.reloader.load(_checked(name))
    except NotAModelDirectory as error:
        raise ModelNotFound(str(error)) from None
    if outcome.outcome == FAILED:
        raise LoadFailed(f"model directory {outcome.directory!r} was not loaded: {outcome.reason}")
    return LoadOutcome(**vars(outcome))


@router.delete("/models/{name}", response_model=LoadOutcome, summary="Unload one model directory")
async def unload_model(service: ServiceDep, name: DirectoryName) -> LoadOutcome:
    try:
        outcome = await service.reloader.unload(_checked(name))
    except NotLoaded as error:
        raise ModelNotFound(str(error)) from None
    if outcome.outcome == FAILED:
        raise Conflict(f"model directory {outcome.directory!r} stays loaded: {outcome.reason}")
    return LoadOutcome(**vars(outcome))


@router.post("/reload", response_model=RescanReport, summary="Rescan MODEL_DIR: load new and changed models, "
                                                             "unload removed ones")
async def rescan(service: ServiceDep) -> RescanReport:
    try:
        outcomes = await service.reloader.rescan()
    except CheckpointError as error:
        raise LoadFailed(service.reloader.public_reason(error)) from None
    by_kind: dict[str, list[LoadOutcome]] = {"loaded": [], "unloaded": [], "failed": []}
    unchanged = []
    for outcome in outcomes:
        if outcome.outcome == UNCHANGED:
            unchanged.append(outcome.directory)
        else:
            by_kind[outcome.outcome].append(LoadOutcome(**vars(outcome)))
    return RescanReport(**by_kind, unchanged=unchanged)
