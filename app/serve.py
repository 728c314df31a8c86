"""The one way the service is launched: ``python -m app.serve --host H --port P``.

Reads ``Settings`` and runs uvicorn with the connection limits a public endpoint needs; ``make serve``,
the container's entry point and the serving benchmarks all start the service through here, so what is
measured is what ships. uvicorn itself never times out a connection that has not finished sending its
request head, and its default parser (httptools) puts no bound on header size, so the HTTP protocol is
uvicorn's httptools protocol with two guards added (``guarded_protocol``):

* the request line and headers must arrive within ``HEADER_TIMEOUT`` seconds of the connection opening
  (or of the first byte of the next request on a kept-alive connection), else 408 and close (slowloris);
  a fresh connection that has sent nothing at all is closed without an answer, since a request it sends
  at that moment would read the 408 as its own;
* they may not exceed ``MAX_HEADER_BYTES``, else 431 and close.

Those guards use private parts of uvicorn (``app.internals`` names them and is checked at start-up).
The body's own inactivity deadline (``BODY_TIMEOUT``) and the limit on requests answered at once
(``MAX_CONNECTIONS``, which leaves ``/healthz`` and ``/readyz`` open) are kept by ``app.middleware``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.internals import missing_internals
from app.settings import Settings

# uvicorn's own shutdown limit, counted after the app's drain (the app traps SIGTERM first, finishes
# in-flight requests within DRAIN_TIMEOUT, then hands the signal on): only closing what is left.
SHUTDOWN_AFTER_DRAIN_S = 5


def _status(code: int, reason: str, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def guarded_protocol(header_timeout: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, refusing request heads that are too slow or too large."""
    too_slow = _status(408, "Request Timeout", f"the request headers did not arrive within {header_timeout:g} s\n")
    too_large = _status(431, "Request Header Fields Too Large",
                        f"the request headers are larger than {max_header_bytes:,} bytes\n")

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0  # bytes of the current head received so far
        _head_tail = b""  # its last 3 bytes: a terminator may be split across reads
        _head_seen = False  # a byte of the current head has arrived
        _in_head = False  # a head is awaited or arriving
        _idle = False  # no message in progress: the next read starts with a head
        _messages = 0  # heads begun on this connection

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._in_head = self._idle = True  # nothing sent yet counts as a head still to come
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # A read that starts inside a head (or between messages) holds head bytes up to the terminator;
            # a head that begins mid-read, behind a pipelined body, is counted from the next read on
            # (slack of one read), since the parser does not say where in the read it began.
            counted = self._in_head or self._idle
            if counted and data:
                self._head_seen = True
                window = self._head_tail + data
                end = window.find(b"\r\n\r\n")
                head_part = len(data) if end < 0 else max(0, end + 4 - len(self._head_tail))
                if self._head_bytes + head_part > max_header_bytes:
                    self._refuse(too_large)
                    return
            messages, begins = self._messages, int(self._idle)
            super().data_received(data)
            if counted and self._in_head and self._messages - messages <= begins and not self.transport.is_closing():
                self._head_bytes += len(data)
                self._head_tail = (self._head_tail + data)[-3:]

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._messages += 1
            self._in_head, self._idle = True, False
            self._head_bytes, self._head_tail = 0, b""
            if self._head_timer is None:
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._in_head, self._head_seen, self._head_bytes, self._head_tail = False, False, 0, b""
            self._cancel_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._idle = True

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self._arm_head_timer()  # a pipelined head behind a response still being sent: wait for it
                return
            if not self._head_seen:
                self._cancel_head_timer()
                self.transport.close()  # nothing sent: no answer, which a request sent just now would misread
                return
            self._refuse(too_slow)

        def _refuse(self, response: bytes) -> None:
            self._cancel_head_timer()
            self._in_head = False
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(response)
            self.transport.close()

    return GuardedHttpToolsProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` (besides host, port, logging and proxying) for ``settings``."""
    return {
        "workers": 1,  # one process: its inference worker owns the device
        "http": guarded_protocol(settings.header_timeout, settings.max_header_bytes),
        "h11_max_incomplete_event_size": settings.max_header_bytes,  # the same bound under --http h11
        # no limit_concurrency: uvicorn's answers 503 to every path, /healthz included, so a cheap connection
        # flood would fail the liveness probe; ConcurrencyLimitMiddleware limits requests and leaves the
        # probes open, and connections that send nothing are closed by the header deadline and keep-alive
        "limit_concurrency": None,
        "timeout_keep_alive": settings.keep_alive_timeout,
        "timeout_graceful_shutdown": SHUTDOWN_AFTER_DRAIN_S,
        "server_header": False,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="address to listen on (HOST)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="port (PORT)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per request")
    parser.add_argument("--root-path", default="", help="the path prefix a proxy serves the API under (ASGI root_path)")
    parser.add_argument("--proxy-headers", action=argparse.BooleanOptionalAction, default=True,
                        help="trust X-Forwarded-For/-Proto from --forwarded-allow-ips for the client address and scheme")
    parser.add_argument("--forwarded-allow-ips", default=None,
                        help="comma-separated addresses (or '*') whose proxy headers are trusted "
                             "(default: $FORWARDED_ALLOW_IPS, else 127.0.0.1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        sys.exit(f"crossmodal: invalid settings: {error}")
    missing = missing_internals()
    if missing:
        sys.exit("crossmodal: the installed uvicorn, Starlette or FastAPI lacks what the service relies on: "
                 + "; ".join(missing) + ". Install the versions pyproject.toml names (see app/internals.py).")
    uvicorn.run("app.main:app", host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log, root_path=args.root_path, proxy_headers=args.proxy_headers,
                forwarded_allow_ips=args.forwarded_allow_ips, **uvicorn_options(settings))


if __name__ == "__main__":
    main()
