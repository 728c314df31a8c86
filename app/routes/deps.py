"""The routes' FastAPI dependencies: the service, the API-key check, and the common query parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import Unauthorized
from app.lifecycle import Service
from app.middleware import api_key_problem

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
