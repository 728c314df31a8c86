"""A route class that reads request bodies with cheap checks before FastAPI validates them.

FastAPI parses a JSON body whole and validates all of it, building an error for every bad item: a
2 MB ``{"texts": [1, 1, …]}`` would be a million values parsed on the event loop, then a million
error dicts. ``GuardedRoute`` parses the (already size-limited) body itself within a budget of values
(a request of ``MAX_ITEMS_PER_REQUEST`` texts needs few), refusing too many items, many unknown
fields and deep nesting as soon as it meets them, and hands the parsed value on to FastAPI (which
reuses it). Forms are parsed with limits on files, fields and field size.
"""

from __future__ import annotations

import asyncio
import json
import json.scanner
import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import Request, Response, params
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute

from app.errors import InvalidInput, PayloadTooLarge
from app.middleware import BodyRule
from app.settings import Settings

MAX_UNKNOWN_FIELDS = 10  # more than this many unknown fields: refused without validating each
# Decoding and parsing a body of megabytes are each milliseconds on the event loop: above this size
# the loop runs other requests' steps between the two, so a short request never waits for both.
YIELD_AFTER_BYTES = 256 * 1024


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    params = route.dependant.body_params
    if len(params) != 1:
        return None
    annotation = params[0].field_info.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


class JsonTooCostly(Exception):
    """A body that ``BoundedParser`` stopped reading: more values or deeper nesting than its budget."""


class _TooManyValues(JsonTooCostly):
    pass


class _TooDeep(JsonTooCostly):
    pass


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # a leaf value, at C speed


class BoundedParser:
    """``json.loads`` for bodies of a few values: containers are walked here, leaves parsed by the C
    scanner, and the walk stops once ``budget`` values or ``max_depth`` levels are passed, so a body
    of a million tiny values costs as much as one of ``budget``. Malformed JSON raises ``ValueError``."""

    def __init__(self, budget: int, max_depth: int = 32) -> None:
        self.budget, self.max_depth = budget, max_depth
        self.keys: list[str] = []  # the top-level object's keys, in order
        self.list_key = ""  # the top-level key whose value is being read
        self.list_items = 0

    def parse(self, text: str) -> Any:
        value, end = self._value(text, _WHITESPACE.match(text, 0).end(), 0)  # type: ignore[union-attr]
        if _WHITESPACE.match(text, end).end() != len(text):  # type: ignore[union-attr]
            raise ValueError("extra data after the JSON value")
        return value

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise _TooManyValues

    def _value(self, text: str, index: int, depth: int) -> tuple[Any, int]:
        if depth > self.max_depth:
            raise _TooDeep
        self._spend()
        opening = text[index:index + 1]
        if opening == "{":
            return self._object(text, index + 1, depth)
        if opening == "[":
            return self._array(text, index + 1, depth)
        try:
            return _scan_once(text, index)  # type: ignore[no-any-return]
        except StopIteration:
            raise ValueError(f"no JSON value at {index}") from None

    def _skip(self, text: str, index: int) -> int:
        return _WHITESPACE.match(text, index).end()  # type: ignore[union-attr]

    def _object(self, text: str, index: int, depth: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        index = self._skip(text, index)
        if text.startswith("}", index):
            return result, index + 1
        while True:
            key, index = self._value(text, index, depth + 1)
            if not isinstance(key, str) or not text.startswith(":", index := self._skip(text, index)):
                raise ValueError(f"expected a string key and ':' at {index}")
            if depth == 0:
                self.keys.append(key)
                self.list_key, self.list_items = key, 0
            result[key], index = self._value(text, self._skip(text, index + 1), depth + 1)
            index = self._skip(text, index)
            if text.startswith("}", index):
                return result, index + 1
            if not text.startswith(",", index):
                raise ValueError(f"expected ',' or '}}' at {index}")
            index = self._skip(text, index + 1)

    def _array(self, text: str, index: int, depth: int) -> tuple[list[Any], int]:
        result: list[Any] = []
        index = self._skip(text, index)
        if text.startswith("]", index):
            return result, index + 1
        while True:
            item, index = self._value(text, index, depth + 1)
            result.append(item)
            if depth == 1:
                self.list_items += 1
            index = self._skip(text, index)
            if text.startswith("]", index):
                return result, index + 1
            if not text.startswith(",", index):
                raise ValueError(f"expected ',' or ']' at {index}")
            index = self._skip(text, index + 1)


async def check_json(request: Request, model: type[BaseModel] | None, max_items: int) -> None:
    """Parse the body within a budget of values and refuse the shapes whose validation would cost
    more than their size: many items, many unknown fields, deep nesting."""
    media_type = _media_type(request)
    if not (media_type == "application/json" or media_type.endswith("+json")):
        return
    body = await request.body()
    if not body:
        return
    fields = list(model.model_fields) if model is not None else []
    # room for every field, MAX_UNKNOWN_FIELDS more, and four times the items a request may hold
    parser = BoundedParser(budget=1 + 2 * (len(fields) + MAX_UNKNOWN_FIELDS) + 4 * max_items + 16)
    try:
        text = body.decode("utf-8")
        if len(body) > YIELD_AFTER_BYTES:  # let waiting requests run between decoding and parsing
            await asyncio.sleep(0)
        value = parser.parse(text)
    except _TooDeep:
        raise InvalidInput("request body is not valid JSON (nested too deeply)") from None
    except _TooManyValues:
        unknown = [key for key in parser.keys if key not in fields]
        if model is not None and len(unknown) > MAX_UNKNOWN_FIELDS:
            shown = ", ".join(repr(key[:40]) for key in unknown[:3])
            raise InvalidInput(f"more than {MAX_UNKNOWN_FIELDS} unknown fields in the request body ({shown}, …); "
                               "it takes only " + ", ".join(repr(name) for name in fields)) from None
        if parser.list_items > max_items:
            raise InvalidInput(f"too many {parser.list_key}: more than {parser.list_items} (at most {max_items} "
                               "per request, MAX_ITEMS_PER_REQUEST)") from None
        raise InvalidInput("the request body holds too many JSON values for a request of at most "
                           f"{max_items} items (MAX_ITEMS_PER_REQUEST)") from None
    except (ValueError, RecursionError):  # malformed, or not UTF-8: FastAPI parses it again and says which
        return
    request._json = value  # FastAPI's request.json() returns this instead of parsing again
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(item, list) and len(item) > max_items:
                raise InvalidInput(f"too many {name}: {len(item)} (at most {max_items} per request, "
                                   "MAX_ITEMS_PER_REQUEST)")


async def read_form(request: Request, max_items: int, max_field_bytes: int) -> None:
    """Parse the form with limits (FastAPI then reuses it): a few more files and fields than
    ``max_items`` items need (a pair may be an empty plain ``files`` field beside its text), and
    text fields no larger than a JSON body."""
    if _media_type(request) not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return
    try:
        await request.form(max_files=2 * max_items, max_fields=2 * max_items + 8, max_part_size=max_field_bytes)
    except HTTPException as error:
        detail = str(error.detail)
        if detail.startswith("Too many"):
            raise InvalidInput(f"too many parts in the form ({detail.rstrip('.')}): send at most {max_items} "
                               "items per request (MAX_ITEMS_PER_REQUEST)") from None
        if "exceeded maximum size" in detail:
            raise PayloadTooLarge(f"a form field is larger than the limit of {max_field_bytes:,} bytes "
                                  "(MAX_JSON_BYTES); send images as files") from None
        raise


class GuardedRoute(APIRoute):
    """An ``APIRoute`` whose body is read through ``check_json`` or ``read_form`` first."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = _body_model(self)

        async def guarded_handler(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                settings = request.app.state.service.settings
                await check_json(request, model, settings.max_items_per_request)
                await read_form(request, settings.max_items_per_request, settings.max_json_bytes)
            return await handler(request)

        return guarded_handler


def body_rules(routes: Sequence[BaseRoute], settings: Settings) -> dict[str, BodyRule]:
    """Each route's body rule by path: forms (uploads) up to ``MAX_UPLOAD_BYTES`` of multipart, JSON
    bodies up to ``MAX_JSON_BYTES`` of JSON."""
    upload = BodyRule(settings.max_upload_bytes, "MAX_UPLOAD_BYTES",
                      ("multipart/form-data", "application/x-www-form-urlencoded"))
    json_body = BodyRule(settings.max_json_bytes, "MAX_JSON_BYTES", ("application/json",))
    rules = {}
    for context in iter_route_contexts(routes):  # routes of included routers too, at their full paths
        route = context.original_route
        if isinstance(route, APIRoute) and route.body_field is not None and context.path:
            rules[context.path] = upload if isinstance(route.body_field.field_info, params.Form) else json_body
    return rules
