"""Typed failures of the service and the one place that turns them into HTTP answers.

Known failures are ``ServiceError`` subclasses carrying their status and a message a person can act
on; they answer ``{"detail": message}``. Request validation errors answer 422 with a readable
``detail`` plus FastAPI's ``errors`` list. Anything else is logged with its traceback and answered
with a plain-text 500 that leaks nothing. Under ``/v2`` (the Open Inference Protocol) the errors are
rewritten to that protocol's ``{"error": message}`` by ``ProtocolErrorMiddleware``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.middleware import route_path

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """A failure the client can act on; ``status_code`` and ``detail`` become the response."""

    status_code = 500

    def __init__(self, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})


class InvalidImage(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail, {"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status_code = 403


class ModelNotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class PayloadTooLarge(ServiceError):
    status_code = 413


class UnsupportedFormat(ServiceError):
    status_code = 415


class InvalidInput(ServiceError):
    status_code = 422


class Unavailable(ServiceError):
    """Overloaded, still starting or shutting down: try again later."""

    status_code = 503

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail, {"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ServiceError):
    status_code = 504


class InferenceFailed(Exception):
    """A batch failed inside the model; answered with a plain 500 (the worker logged the traceback)."""


def _field_name(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_message(errors: list[Any]) -> str:
    messages = []
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            messages.append("request body is not valid JSON" + (f" ({reason})" if reason else ""))
        else:
            messages.append(f"{_field_name(error.get('loc', ()))}: {error.get('msg', 'invalid')}")
    return "; ".join(messages) or "invalid request"


MAX_REPORTED_ERRORS = 10  # a body with thousands of bad items gets the first few, not an answer larger than itself
# an absolute path of two or more segments, not one of this service's URLs (``/v1/models`` stays as it is)
_PATH = re.compile(r"(?<![\w.~/-])/(?!v1/)(?:[^\s'\"/:,;()]+/)+([^\s'\"/:,;()]+)")


def scrub_paths(text: str) -> str:
    """``text`` with each absolute file path cut to its last component: public answers name no paths."""
    return _PATH.sub(r"\1", text)


async def _service_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ServiceError)
    if error.status_code >= 500:
        logger.warning("%s %s → %d: %s", request.method, request.url.path, error.status_code, error.detail)
    return JSONResponse({"detail": scrub_paths(error.detail)}, error.status_code, headers=error.headers)


async def _validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    all_errors = error.errors()
    errors = all_errors[:MAX_REPORTED_ERRORS]
    brief = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
             for e in errors]
    detail = validation_message(list(errors))
    if len(all_errors) > len(errors):
        detail += f"; and {len(all_errors) - len(errors):,} more errors"
    body = {"detail": detail, "errors": jsonable_encoder(brief)}
    return JSONResponse(body, 422)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    if error.status_code == 400 and request.headers.get("content-type", "").startswith("application/json"):
        # FastAPI's answer to a body that is not even text (e.g. not UTF-8): malformed JSON, like any other
        return JSONResponse({"detail": "request body is not valid JSON (it must be UTF-8 text)"}, 422)
    return JSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)


async def _inference_failed(request: Request, error: Exception) -> Response:
    logger.error("%s %s → 500: %s", request.method, request.url.path, error)
    return PlainTextResponse("Internal Server Error", 500)


async def _unexpected(request: Request, error: Exception) -> Response:
    logger.error("%s %s → 500", request.method, request.url.path, exc_info=error)
    return PlainTextResponse("Internal Server Error", 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(InferenceFailed, _inference_failed)
    app.add_exception_handler(Exception, _unexpected)


def protocol_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An error answer as the Open Inference Protocol gives it: ``{"error": message}``, and 400 for
    invalid input (the protocol has no 422)."""
    status = 400 if status == 422 else status
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("detail"), str):
        message = parsed["detail"]
    elif isinstance(parsed, dict):
        return status, body  # a body of its own shape (the protocol's {"error": …}, or {"ready": false})
    else:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return status, json.dumps({"error": message}).encode()


class ProtocolErrorMiddleware:
    """Rewrites each error answer (status 400 and up) under ``prefix`` with ``protocol_error``: those
    of the exception handlers (``install_error_handlers``) and the refusals of the middleware inside
    this one (401, 408, 413, 415, 503), which answer before any route runs. Successful answers pass
    untouched; so does the plain 500 for an unexpected exception, which Starlette answers outside
    all middleware."""

    def __init__(self, app: ASGIApp, prefix: str = "/v2") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if not (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and int(message["status"]) >= 400:
                start = message  # held until the body is complete: error bodies are a few hundred bytes
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status, body = protocol_error(int(start["status"]), b"".join(chunks))
            headers = [(key, value) for key, value in start.get("headers", [])
                       if key.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**start, "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting_send)
