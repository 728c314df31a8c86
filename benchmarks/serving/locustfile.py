"""Locust user for the serving benchmark: POSTs a prepared request body, as fast as allowed.

Configured by environment: BENCH_BODY (path of the request body, or ``@LIST``: a file listing
body paths, sent in turn), BENCH_CONTENT_TYPE, BENCH_PATH
(URL path), BENCH_API_KEY (optional), BENCH_RATE_PER_USER (requests/s per user; unset or 0: no wait).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, task

_SOURCE = os.environ.get("BENCH_BODY", "body.bin")
_PATHS = Path(_SOURCE[1:]).read_text().split() if _SOURCE.startswith("@") else [_SOURCE]
_BODIES = itertools.cycle([Path(path).read_bytes() for path in _PATHS])
_HEADERS = {"Content-Type": os.environ.get("BENCH_CONTENT_TYPE", "application/octet-stream")}
if os.environ.get("BENCH_API_KEY"):
    _HEADERS["X-API-Key"] = os.environ["BENCH_API_KEY"]
_RATE = float(os.environ.get("BENCH_RATE_PER_USER", "0"))


class ImageClient(FastHttpUser):
    wait_time = constant_throughput(_RATE) if _RATE > 0 else constant(0)

    @task
    def classify(self) -> None:
        path = os.environ.get("BENCH_PATH", "/v1/image/classify")
        self.client.post(path, data=next(_BODIES), headers=_HEADERS, name="classify")  # type: ignore[arg-type]
