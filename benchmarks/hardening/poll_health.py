"""Polls a service's ``/healthz`` every 50 ms from a process of its own, until its stdin closes, then
prints what it saw as JSON: each answer's seconds and when it was sent, and the failures.

A poller thread inside the load generator shares that process's GIL with the attackers' threads and
the memory sampler, so its timings include the generator's own stalls; this one measures the service.

    python benchmarks/hardening/poll_health.py http://127.0.0.1:8000 < /dev/null
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit

INTERVAL_S = 0.05


def poll(url: str, stop: threading.Event) -> dict[str, object]:
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port or 80, timeout=5)
    origin = time.perf_counter()
    seconds: list[float] = []
    sent_at: list[float] = []
    failures = 0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                failures += 1
        except (OSError, http.client.HTTPException):
            failures += 1
            connection.close()  # reconnects on the next request
        seconds.append(time.perf_counter() - started)
        sent_at.append(started - origin)
        stop.wait(INTERVAL_S)
    return {"seconds": seconds, "sent_at": sent_at, "failures": failures}


def main() -> None:
    stop = threading.Event()
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(poll(sys.argv[1], stop)), daemon=True)
    worker.start()
    sys.stdin.read()  # returns when the benchmark closes our stdin
    stop.set()
    worker.join()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
