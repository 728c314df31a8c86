"""The private parts of uvicorn, Starlette and FastAPI the service relies on, and the check that they are there.

``app.serve`` subclasses uvicorn's httptools protocol (its header deadline and size guards use the
protocol's ``loop``, ``transport``, ``cycle`` and parser callbacks, and the cycle's
``response_complete``); ``app.routes.guarded`` hands its parsed JSON to FastAPI through Starlette's
``Request._json``; ``app.main`` and ``app.routes.guarded`` use FastAPI's ``fastapi.telemetry`` and
``fastapi.routing.iter_route_contexts``. None of these is a stable interface, so ``pyproject.toml`` pins
uvicorn's minor version and sets FastAPI's and Starlette's floors, and ``python -m app.serve`` runs
``missing_internals`` before it starts: an upgrade that drops one fails at start-up with its name,
not on the first request.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

PROTOCOL_METHODS = ("connection_made", "connection_lost", "data_received", "on_message_begin",
                    "on_headers_complete", "on_message_complete")
PROTOCOL_ATTRIBUTES = ("loop", "transport", "cycle")
CYCLE_ATTRIBUTES = ("response_complete",)
FASTAPI_NAMES = (("fastapi.routing", "iter_route_contexts"), ("fastapi.telemetry", "TelemetryConfig"))


async def _noop_app(scope: Any, receive: Any, send: Any) -> None:
    return None


def _uvicorn_missing() -> list[str]:
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    from uvicorn.server import ServerState

    missing = [f"HttpToolsProtocol.{name}()" for name in PROTOCOL_METHODS if not callable(getattr(HttpToolsProtocol, name,
                                                                                                   None))]
    # the attributes are set by the constructors: build one of each (nothing is connected or run)
    loop = asyncio.new_event_loop()
    try:
        protocol = HttpToolsProtocol(config=Config(app=_noop_app, log_config=None), server_state=ServerState(),
                                     app_state={}, _loop=loop)
        missing += [f"HttpToolsProtocol.{name}" for name in PROTOCOL_ATTRIBUTES if not hasattr(protocol, name)]
        if getattr(protocol, "loop", None) is not loop:
            missing.append("HttpToolsProtocol.loop (the event loop)")
    except Exception as error:  # any failure to build it is the answer
        missing.append(f"HttpToolsProtocol(config, server_state, app_state, _loop) ({type(error).__name__}: {error})")
    finally:
        loop.close()
    try:
        parameters = inspect.signature(RequestResponseCycle).parameters
        placeholders: dict[str, Any] = dict.fromkeys(parameters)  # stored, not used: nothing runs
        cycle = RequestResponseCycle(**placeholders)
        missing += [f"RequestResponseCycle.{name}" for name in CYCLE_ATTRIBUTES if not hasattr(cycle, name)]
    except Exception as error:
        missing.append(f"RequestResponseCycle(...) ({type(error).__name__}: {error})")
    return missing


def _starlette_missing() -> list[str]:
    """Whether ``Request.json()`` returns a value set in ``Request._json`` instead of parsing the body again."""
    from starlette.requests import Request

    async def body() -> dict[str, Any]:
        return {"type": "http.request", "body": b"[]", "more_body": False}

    async def reused() -> bool:
        request = Request({"type": "http", "method": "POST", "headers": []}, body)
        request._json = {"parsed": "already"}
        return bool(await request.json() == {"parsed": "already"})

    try:
        return [] if asyncio.run(reused()) else ["starlette Request.json() no longer returns Request._json"]
    except Exception as error:
        return [f"starlette Request._json ({type(error).__name__}: {error})"]


def missing_internals() -> list[str]:
    """The private names this service relies on that the installed uvicorn, Starlette or FastAPI lacks."""
    missing = _uvicorn_missing() + _starlette_missing()
    for module, name in FASTAPI_NAMES:
        try:
            found = hasattr(importlib.import_module(module), name)
        except ImportError:
            found = False
        if not found:
            missing.append(f"{module}.{name}")
    return missing
