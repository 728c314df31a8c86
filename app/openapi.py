"""The OpenAPI document: the error responses each route declares, and uploads the /docs page can pick.

FastAPI describes an optional upload as ``anyOf: [{type: string, contentMediaType: ...}, {type: null}]``
(and a list of them likewise; a part that may also be a plain field, ``UploadFile | str``, adds a
``{type: string}`` branch). Swagger UI shows a file picker only for a plain
``{type: string, format: binary}``, so uploads are rewritten to that form; what the server accepts
is unchanged (the fields stay optional: they are not ``required``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas import ErrorBody


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


def _is_upload(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string" and ("contentMediaType" in schema or schema.get("format") == "binary")


def _is_upload_item(schema: dict[str, Any]) -> bool:
    """An upload, or an upload-or-plain-string (a multipart part that may be an empty plain field)."""
    branches = schema.get("anyOf", [schema])
    return any(_is_upload(b) for b in branches) and all(b.get("type") == "string" for b in branches)


def _plain_upload(prop: dict[str, Any]) -> dict[str, Any] | None:
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    if len(branches) != 1:
        return None
    branch = branches[0]
    keep: dict[str, Any] = {k: prop[k] for k in ("title", "description") if k in prop}
    if _is_upload(branch):
        return {"type": "string", "format": "binary", **keep}
    if branch.get("type") == "array" and _is_upload_item(branch.get("items", {})):
        return {"type": "array", "items": {"type": "string", "format": "binary"}, **keep}
    return None


def swagger_friendly_uploads(schema: dict[str, Any]) -> dict[str, Any]:
    for component in schema.get("components", {}).get("schemas", {}).values():
        properties = component.get("properties", {})
        for name, prop in properties.items():
            plain = _plain_upload(prop)
            if plain is not None:
                properties[name] = plain
    return schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = swagger_friendly_uploads(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes,
                openapi_version=app.openapi_version,
            ))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
