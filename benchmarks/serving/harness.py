"""Benchmark plumbing: server processes (time to ready, RSS), load generators (wrk, locust), /metrics scraping."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server subprocess; ``ready_s`` is launch → first 200 from ``ready_path``."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, ready_path: str,
                 log_dir: Path) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.memory_at_ready: dict[str, float] = {}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.ready_s = self._wait_ready(ready_path)

    def _wait_ready(self, path: str, timeout: float = 300) -> float:
        until = time.perf_counter() + timeout
        while time.perf_counter() < until:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} not ready after {timeout} s")

    def processes(self) -> list[psutil.Process]:
        """The server's process and all its descendants (worker, tokenizer and fork-server processes)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def memory(self) -> dict[str, float]:
        """MB: the main process's RSS, and the proportional set size (PSS) of the whole process tree.

        Servers with worker processes (LitServe's workers, our tokenizer processes) map the same
        libraries and share copy-on-write pages; summing RSS would count those once per process,
        PSS splits each shared page among the processes that map it.
        """
        root, *_ = tree = self.processes()
        pss = 0
        for process in tree:
            with contextlib.suppress(psutil.Error):
                pss += process.memory_full_info().pss
        return {"rss_main_mb": root.memory_info().rss / 2**20, "pss_total_mb": pss / 2**20, "processes": len(tree)}

    def pause(self) -> None:
        """SIGSTOP the server's whole session (its worker processes too) while others are measured."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Whatever is left of the session: LitServe's forked workers outlive their parent on SIGTERM
        # and spin at full CPU, which would skew every server measured after them.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


def start_service(name: str, env: dict[str, str], log_dir: Path) -> ServerProcess:
    """The project's service as it ships (``python -m app.serve``: uvicorn with the service's connection
    limits) on a free local port, with ``env`` on top of this process's environment; returns once
    ``/readyz`` says 200."""
    port = free_port()
    command = [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port),
               "--no-access-log", "--log-level", "warning"]
    return ServerProcess(name, command, env, port, "/readyz", log_dir)


@dataclasses.dataclass
class LoadResult:
    clients: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    tool: str


def pick_tool(wanted: str) -> str:
    if wanted == "auto":
        return "wrk" if shutil.which("wrk") else "locust"
    if wanted == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk), use --tool locust")
    return wanted


@dataclasses.dataclass
class Payload:
    """Request bodies on disk, for the load tools: ``path`` is one body, or (``@``-prefixed) a file
    listing several, one path per line, which the tools send in turn."""

    path: str
    content_type: str


def _body(sample: bytes, kind: str) -> tuple[bytes, str]:
    if kind == "json-text":
        return json.dumps({"text": sample.decode()}).encode(), "application/json"
    if kind == "json-b64":
        return json.dumps({"image": base64.b64encode(sample).decode()}).encode(), "application/json"
    field, boundary = kind.removeprefix("multipart:"), "----crossmodalbench7MA4YWxkTrZu0gW"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"image.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + sample + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def write_payload(samples: list[bytes], kind: str, directory: Path) -> Payload:
    """``samples`` as request bodies: an image as ``multipart:FIELD`` (our API) or ``json-b64``
    (LitServe's idiom: its workers cannot take uploads); a UTF-8 text as ``json-text``
    (``{"text": ...}``, both servers). Several samples are sent in turn: distinct texts keep a
    server's tokenisation honest (a cache would make one repeated text look free)."""
    stem = f"body-{kind.replace(':', '-')}"
    paths = []
    for number, sample in enumerate(samples):
        body, content_type = _body(sample, kind)
        path = directory / f"{stem}-{number}.bin"
        path.write_bytes(body)
        paths.append(path)
    if len(paths) == 1:
        return Payload(str(paths[0]), content_type)
    listing = directory / f"{stem}.list"
    listing.write_text("".join(f"{path}\n" for path in paths))
    return Payload(f"@{listing}", content_type)


def run_wrk(url: str, payload: Payload, clients: int, seconds: float, api_key: str = "",
            mean_delay_ms: float = 0.0) -> LoadResult:
    """wrk with ``clients`` connections; ``mean_delay_ms`` > 0 paces each (see wrk_post.lua)."""
    command = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
               "-s", str(HERE / "wrk_post.lua"), url, "--", payload.path, payload.content_type, api_key,
               f"{mean_delay_ms:.3f}"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("WRK_JSON "))
    values = json.loads(line.removeprefix("WRK_JSON "))
    duration = values["duration_us"] / 1e6
    errors = sum(values[k] for k in ("non_2xx", "connect_errors", "read_errors", "write_errors", "timeouts"))
    return LoadResult(clients, values["requests"], errors, duration, values["requests"] / duration,
                      values["p50_us"] / 1000, values["p95_us"] / 1000, values["p99_us"] / 1000, "wrk")


def run_locust(url: str, path: str, payload: Payload, clients: int, seconds: float, api_key: str = "",
               rate_per_user: float = 0.0) -> LoadResult:
    with tempfile.TemporaryDirectory() as scratch:
        stats, run_seconds = Path(scratch) / "stats.json", max(1, round(seconds))
        env = {**os.environ, "BENCH_BODY": payload.path, "BENCH_CONTENT_TYPE": payload.content_type,
               "BENCH_PATH": path, "BENCH_API_KEY": api_key, "BENCH_RATE_PER_USER": str(rate_per_user)}
        # --json-file holds the final stats; the --csv file is rewritten only every few seconds and
        # lagged behind them (seen here: 140 of 188 requests after 3 s, none after 1 s)
        command = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(clients),
                   "-r", str(clients), "-t", f"{run_seconds}s", "--host", url, "--json-file",
                   str(stats.with_suffix("")), "--only-summary", "--loglevel", "WARNING"]
        subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        endpoints = json.loads(stats.read_text())
    requests = sum(endpoint["num_requests"] for endpoint in endpoints)
    failures = sum(endpoint["num_failures"] for endpoint in endpoints)
    latencies: Counter[float] = Counter()  # locust's histogram: rounded milliseconds → count
    for endpoint in endpoints:
        latencies.update({float(ms): count for ms, count in endpoint["response_times"].items()})
    p50, p95, p99 = (_percentile(latencies, q) for q in (0.50, 0.95, 0.99))
    return LoadResult(clients, requests, failures, seconds, requests / run_seconds, p50, p95, p99, "locust")


def _percentile(histogram: Counter[float], q: float) -> float:
    """The smallest value with at least ``q`` of the counts at or below it (NaN when empty)."""
    total, seen = sum(histogram.values()), 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= q * total:
            return value
    return float("nan")


def drive(tool: str, base_url: str, path: str, payload: Payload, clients: int, seconds: float,
          api_key: str = "") -> LoadResult:
    if tool == "wrk":
        return run_wrk(base_url + path, payload, clients, seconds, api_key)
    return run_locust(base_url, path, payload, clients, seconds, api_key)


def scrape(url: str) -> dict[str, float]:
    """Sums of the service's histograms and counters (all label sets added up)."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith("crossmodal_") and (sample.name.endswith(("_sum", "_count", "_total"))):
                totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


def time_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Where a classify request's time went during one load level (means, milliseconds)."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    requests = delta("crossmodal_preprocess_seconds_count") or 1.0
    items = delta("crossmodal_batch_size_sum") or 1.0
    batches = delta("crossmodal_batch_size_count") or 1.0
    latency_all = delta("crossmodal_http_request_duration_seconds_sum")
    return {
        "mean_batch_size": items / batches,
        "preprocess_ms": 1000 * delta("crossmodal_preprocess_seconds_sum") / requests,
        "queue_wait_ms": 1000 * delta("crossmodal_queue_wait_seconds_sum") / items,
        "batch_compute_ms": 1000 * delta("crossmodal_batch_compute_seconds_sum") / batches,
        "server_latency_ms": 1000 * latency_all / max(1.0, delta("crossmodal_http_request_duration_seconds_count")),
    }
