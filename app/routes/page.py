"""The page for people (``GET /``): pick a model, drop an image and/or type a text, see the calibrated distribution.

One HTML document whose script and stylesheet ship in the package (``app/static/``, package data), so the page
works offline and its Content-Security-Policy can refuse inline code and every other origin. The page calls the
public API from the browser, so the API-key check guards it as it guards any other client; the page itself stays
open, like /docs, and stays out of the OpenAPI document (it is not part of the API).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, HTTPException, Response

router = APIRouter(include_in_schema=False)

STATIC = files("app") / "static"
ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}

# Everything from this origin only: no inline script or style, no plug-ins, no framing. blob: for the preview
# of the chosen image (an object URL of the local file, never uploaded to show it).
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/")
async def page() -> Response:
    return Response(_read("page.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)  # a fixed list: no path from the request ever reaches the file system
    if media_type is None:
        raise HTTPException(404, f"no static file named {name!r}")
    return Response(_read(name), media_type=media_type, headers=_HEADERS)
