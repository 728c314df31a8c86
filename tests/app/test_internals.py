"""The private uvicorn, Starlette and FastAPI parts the service relies on are there in the installed versions."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.internals import PROTOCOL_METHODS, missing_internals
from app.middleware import route_path
from app.serve import guarded_protocol


def test_installed_uvicorn_starlette_and_fastapi_have_every_private_part_used() -> None:
    assert missing_internals() == []


def test_the_guarded_protocol_overrides_only_methods_uvicorn_has() -> None:
    guarded = guarded_protocol(1.0, 1024)
    overridden = {name for name in vars(guarded) if not name.startswith("_") and callable(vars(guarded)[name])}
    assert overridden <= set(PROTOCOL_METHODS)
    assert all(callable(getattr(HttpToolsProtocol, name)) for name in overridden)
    assert issubclass(guarded, asyncio.Protocol)


def test_paths_are_matched_without_the_root_path() -> None:
    assert route_path({"path": "/api/v1/models", "root_path": "/api"}) == "/v1/models"
    assert route_path({"path": "/api", "root_path": "/api/"}) == "/"
    assert route_path({"path": "/apix/v1/models", "root_path": "/api"}) == "/apix/v1/models"
    assert route_path({"path": "/v1/models"}) == "/v1/models"
