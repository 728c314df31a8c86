"""Pure-ASGI middleware: request ids, the limit on requests at once, the API-key check, and the body rules.

These run before any body is read, so the cheap refusals come first: beyond ``MAX_CONNECTIONS``
requests at once a request is answered 503 (``/healthz`` and ``/readyz`` never are, so the probes
survive a flood); a request to ``/v1`` without a valid key is answered 401 before one byte of its body
is read; a body's ``Content-Length`` and ``Content-Type`` are checked against the route's rule (413,
415) before reading; a body without a length is counted chunk by chunk and refused as soon as it passes
the limit, so an oversized upload is never held in memory whole; and a body that stops arriving for
``BODY_TIMEOUT`` seconds is answered 408 (a slow upload that keeps moving is not).

Paths are matched without the ASGI ``root_path`` (``route_path``), so ``--root-path`` changes nothing here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import re
import uuid
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Takes a sane ``X-Request-ID`` from the client or makes one; echoes it on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def api_key_problem(authorization: str, header_key: str, keys: frozenset[str]) -> str | None:
    """Why a request's credentials do not pass (``None``: they do): ``Authorization: Bearer <key>``
    or ``X-API-Key: <key>``, compared in constant time."""
    supplied = header_key
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return "the Authorization header must be 'Bearer <key>'"
        supplied = credentials.strip()
    if not supplied:
        return "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    if not any(hmac.compare_digest(supplied.encode(), key.encode()) for key in keys):
        return "the API key is not valid"
    return None


def route_path(scope: Scope) -> str:
    """The request's path as the app's routes see it: ``scope["path"]`` without the ``root_path`` prefix
    (uvicorn puts it in front of the path)."""
    path, root = str(scope["path"]), str(scope.get("root_path", "")).rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def _refuse(send: Send, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
    """A JSON error answered without reading the body, closing the connection (the unread body with it)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                            *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": body})


class ConcurrencyLimitMiddleware:
    """503 with ``Retry-After`` for a request beyond ``limit`` being answered at once; the probes in
    ``exempt`` are always answered (a flood must not fail the liveness probe and restart the service)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[str] = frozenset({"/healthz", "/readyz"})) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await _refuse(send, 503, f"the service is answering {self.limit:,} requests already (MAX_CONNECTIONS); "
                                     "try again shortly", {"Retry-After": "1"})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class ApiKeyMiddleware:
    """401 for a request under ``prefix`` without a valid key, before anything reads its body."""

    def __init__(self, app: ASGIApp, keys: frozenset[str], prefix: str = "/v1/") -> None:
        self.app = app
        self.keys = keys
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and route_path(scope).startswith(self.prefix):
            problem = api_key_problem((_header(scope, b"authorization") or b"").decode("latin-1"),
                                      (_header(scope, b"x-api-key") or b"").decode("latin-1"), self.keys)
            if problem is not None:
                await _refuse(send, 401, problem, {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


@dataclasses.dataclass(frozen=True)
class BodyRule:
    """What one route's request body may be: at most ``max_bytes`` (the setting ``setting`` says so)
    of one of ``media_types`` (any type when empty)."""

    max_bytes: int
    setting: str
    media_types: tuple[str, ...] = ()

    def accepts(self, content_type: str) -> bool:
        media_type = content_type.partition(";")[0].strip().lower()
        return not self.media_types or any(
            media_type == wanted or (wanted == "application/json" and media_type.endswith("+json"))
            for wanted in self.media_types)


class BodyTooLarge(HTTPException):
    def __init__(self, rule: BodyRule) -> None:
        super().__init__(413, f"request body is larger than the limit of {rule.max_bytes:,} bytes ({rule.setting})")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"no part of the request body arrived for {seconds:g} s (BODY_TIMEOUT)",
                         headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Checks each request's body against its route's ``BodyRule`` (``default`` for paths not in
    ``rules``, whose keys are paths or path patterns such as ``/v2/models/{name}/infer``): length and
    type before reading, size while receiving, and ``body_timeout`` between one part of the body and
    the next (an inactivity deadline: a slow upload that keeps moving may take longer)."""

    def __init__(self, app: ASGIApp, default: BodyRule, rules: Mapping[str, BodyRule] | None = None,
                 body_timeout: float = 30.0) -> None:
        self.app = app
        self.default = default
        self.rules = {path: rule for path, rule in (rules or {}).items() if "{" not in path}
        # a parameter matches one path segment, as in the routes
        self.patterns = [(re.compile("^" + re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(path)) + "$"), rule)
                         for path, rule in (rules or {}).items() if "{" in path]
        self.body_timeout = body_timeout

    def rule_for(self, path: str) -> BodyRule:
        rule = self.rules.get(path)
        if rule is None:
            rule = next((rule for pattern, rule in self.patterns if pattern.match(path)), self.default)
        return rule

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = self.rule_for(route_path(scope))
        declared = _header(scope, b"content-length")
        if declared is not None and not declared.strip().isdigit():
            await _refuse(send, 400, "the Content-Length header must be a whole number of bytes")
            return
        if declared is not None and int(declared) > rule.max_bytes:
            await _refuse(send, 413, BodyTooLarge(rule).detail)
            return
        has_body = (declared is not None and int(declared) > 0) or _header(scope, b"transfer-encoding") is not None
        content_type = (_header(scope, b"content-type") or b"").decode("latin-1")
        if has_body and not rule.accepts(content_type):
            wanted = " or ".join(rule.media_types)
            if content_type:
                detail = f"the request body must be {wanted}, not {content_type!r} (Content-Type header)"
            else:
                detail = f"the request body must be {wanted}, sent with that Content-Type header; it had none"
            await _refuse(send, 415, detail)
            return
        received = 0
        complete = not has_body
        started = False

        async def counting_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout):  # per part: a deadline on silence, not on the upload
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > rule.max_bytes:
                    raise BodyTooLarge(rule)  # FastAPI re-raises HTTPExceptions from body reading
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as error:
            if started:
                raise
            await _refuse(send, error.status_code, error.detail)
