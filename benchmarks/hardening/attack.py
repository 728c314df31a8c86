"""A normal client without an attack, beside a paced attack mix, and beside the same mix flat out, side by side.

    python benchmarks/hardening/attack.py --seconds 10 --attack-rate 2 --output benchmarks/hardening/RESULTS

Starts the service as it ships (``harness.start_service``), then runs three phases of ``--seconds``
each, the normal client (a paced text client: wrk when installed, else a Python client at a fixed
rate) in every one: alone; while attackers run in parallel, each sending its hostile request
``--attack-rate`` times a second (big JSON bodies, many unknown keys, 1,000 form fields, slowloris
sockets, long texts of '☃', RLE8 BMP decompression bombs, unauthenticated big bodies); and while the
same attackers send one request after another. Throughout, ``/healthz`` is polled every 50 ms and the
RSS of the service's process tree sampled; the CPU seconds of this process (the load generator: the
attackers' threads, and the Python client) and of the service's process tree are counted per phase,
since on a small machine the load generator's own CPU slows the service too. Writes ``OUTPUT.json``
and ``OUTPUT.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.settings import Settings  # noqa: E402
from benchmarks.serving import harness  # noqa: E402

API_KEY = "hardening-bench-key"
TEXTS = ["The shuttle launch was delayed by a faulty sensor on the booster.",
         "Which graphics card runs X11 best under Linux?",
         "The goalie made 40 saves in the playoff game last night.",
         "Has anyone tried the new motherboard with two CPUs?"]


def rle8_bomb(width: int = 6000, height: int = 6000) -> bytes:
    """A small BMP declaring ``width`` × ``height`` 8-bit pixels, RLE8-compressed: a few runs, then end of bitmap."""
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    data = (b"\xff\x01" * 20 + b"\x00\x00") * 200 + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    header = struct.pack("<2sIHHI", b"BM", offset + len(data), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    return header + info + palette + data


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "hardeningbench7MA4YWxk"
    chunks = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def attacks() -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """name → (path, body, headers): one hostile request each, sent over and over."""
    json_type = {"Content-Type": "application/json", "X-API-Key": API_KEY}
    fields, fields_type = _multipart([("texts", None, b"hello")] * 1000)
    bombs, bombs_type = _multipart([("files", f"bomb{i}.bmp", rle8_bomb()) for i in range(16)])
    limit = int(Settings.model_fields["max_json_bytes"].default)  # the service runs with the default
    return {
        "json-array-under-limit": ("/v1/text/classify", b'{"texts": [' + b"1," * (limit // 2 - 100) + b"1]}", json_type),
        "json-array-over-limit": ("/v1/text/classify", b'{"texts": [' + b"1," * (limit // 2 + 2**19) + b"1]}",
                                  json_type),
        "unknown-keys-150k": ("/v1/text/classify", json.dumps({f"k{i}": 1 for i in range(150_000)}).encode(),
                              json_type),
        "snowmen-64x19000": ("/v1/text/classify", json.dumps({"texts": ["☃" * 19_000] * 64},
                                                            ensure_ascii=False).encode(), json_type),
        "snowmen-8x19000": ("/v1/text/classify", json.dumps({"texts": ["☃" * 19_000] * 8},
                                                           ensure_ascii=False).encode(), json_type),
        "form-fields-1000": ("/v1/multimodal/classify", fields, {"Content-Type": fields_type, "X-API-Key": API_KEY}),
        "rle8-bombs-16": ("/v1/image/classify", bombs, {"Content-Type": bombs_type, "X-API-Key": API_KEY}),
        "no-key-2MB": ("/v1/text/classify", b'{"texts": ["' + b"a" * 2_000_000 + b'"]}',
                       {"Content-Type": "application/json"}),
    }


class Recorder:
    """Status counts and worst latency of one attacker."""

    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.worst_s = 0.0

    def add(self, status: str, elapsed: float) -> None:
        self.statuses[status] += 1
        self.worst_s = max(self.worst_s, elapsed)


def run_attacker(url: str, path: str, body: bytes, headers: dict[str, str], stop: threading.Event,
                 record: Recorder, rate: float) -> None:
    """Send the request ``rate`` times a second (0: one after another); a slow answer delays the next."""
    with httpx.Client(base_url=url, timeout=30) as client:
        next_at = time.perf_counter()
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = str(client.post(path, content=body, headers=headers).status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            record.add(status, time.perf_counter() - started)
            if rate > 0:
                next_at = max(next_at + 1 / rate, time.perf_counter() - 1 / rate)  # no burst to catch up
                stop.wait(max(0.0, next_at - time.perf_counter()))


def run_slowloris(port: int, sockets: int, stop: threading.Event, record: Recorder) -> None:
    """Keep ``sockets`` connections sending a request head one byte every 0.2 s; count how each ends."""
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 10_000
    open_: list[tuple[socket.socket, float, int]] = []
    while not stop.is_set():
        while len(open_) < sockets:
            sock = socket.create_connection(("127.0.0.1", port), timeout=1)
            sock.setblocking(False)
            open_.append((sock, time.perf_counter(), 0))
        kept = []
        for sock, started, sent in open_:
            try:
                reply = sock.recv(1024)
                record.add(reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/1.1") else "closed",
                           time.perf_counter() - started)
                sock.close()
                continue
            except BlockingIOError:
                pass
            except OSError:
                record.add("reset", time.perf_counter() - started)
                sock.close()
                continue
            try:
                sock.send(head[sent % len(head):][:1])
                kept.append((sock, started, sent + 1))
            except OSError:
                record.add("reset", time.perf_counter() - started)
                sock.close()
        open_ = kept
        stop.wait(0.2)
    for sock, started, _ in open_:
        record.add("open at end", time.perf_counter() - started)
        sock.close()


def percentile(values: list[float], fraction: float) -> float:
    """The value ``fraction`` of the way up the sorted values (nan for none)."""
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Watch:
    """Polls /healthz every 50 ms from a process of its own (``poll_health.py``: out of reach of this
    process's GIL) and samples the process tree's RSS every 100 ms."""

    def __init__(self, server: harness.ServerProcess) -> None:
        self.server = server
        self.peak_rss_mb = 0.0
        self.stop = threading.Event()
        self.poller = subprocess.Popen([sys.executable, str(Path(__file__).with_name("poll_health.py")), server.url],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.memory = threading.Thread(target=self._memory, daemon=True)
        self.memory.start()

    def _memory(self) -> None:
        while not self.stop.is_set():
            total = 0
            for process in self.server.processes():
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak_rss_mb = max(self.peak_rss_mb, total / 2**20)
            self.stop.wait(0.1)

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.memory.join()
        output, _ = self.poller.communicate("", timeout=30)
        health = json.loads(output)
        seconds, sent_at = health["seconds"], health["sent_at"]
        worst = max(range(len(seconds)), key=seconds.__getitem__) if seconds else None
        return {"healthz_worst_ms": 1000 * seconds[worst] if worst is not None else float("nan"),
                "healthz_worst_at_s": round(sent_at[worst], 2) if worst is not None else float("nan"),
                "healthz_failures": health["failures"], "healthz_polls": len(seconds),
                "healthz_p99_ms": 1000 * percentile(seconds, 0.99),
                "healthz_over_100ms": sum(value > 0.1 for value in seconds), "peak_rss_tree_mb": self.peak_rss_mb}


def python_client(url: str, seconds: float, rate: float) -> dict[str, Any]:
    """One request every 1/``rate`` s (not closed-loop: a slow answer does not lower the offered rate)."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def one(text: str) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            ok = httpx.post(url + "/v1/text/classify", json={"text": text}, headers={"X-API-Key": API_KEY},
                            timeout=30).status_code == 200
        except httpx.HTTPError:
            ok = False
        with lock:
            latencies.append(time.perf_counter() - started)
            errors += not ok

    threads = []
    until = time.perf_counter() + seconds
    number = 0
    while time.perf_counter() < until:
        thread = threading.Thread(target=one, args=(TEXTS[number % len(TEXTS)],))
        thread.start()
        threads.append(thread)
        number += 1
        time.sleep(1 / rate)
    for thread in threads:
        thread.join()
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / seconds,
            "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99),
            "tool": "python"}


def normal_client(tool: str, url: str, seconds: float, rate: float, scratch: Path) -> dict[str, Any]:
    if tool == "wrk":
        payload = harness.write_payload([text.encode() for text in TEXTS], "json-text", scratch)
        connections = 4
        result = harness.run_wrk(url + "/v1/text/classify", payload, connections, seconds, API_KEY,
                                 mean_delay_ms=1000 * connections / rate)
        return {"requests": result.requests, "errors": result.errors, "rps": result.rps, "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms, "tool": "wrk"}
    return python_client(url, seconds, rate)


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def run_phase(server: harness.ServerProcess, tool: str, seconds: float, rate: float, scratch: Path,
              attack_rate: float | None, slowloris_sockets: int, skip: frozenset[str] = frozenset()) -> dict[str, object]:
    """One phase: the normal client, with the attack mix at ``attack_rate`` requests/s per attacker
    (0: flat out; ``None``: no attack)."""
    stop = threading.Event()
    records: dict[str, Recorder] = {}
    threads: list[threading.Thread] = []
    if attack_rate is not None:
        for name, (path, body, headers) in attacks().items():
            if name in skip:
                continue
            records[name] = Recorder()
            threads.append(threading.Thread(target=run_attacker, daemon=True,
                                            args=(server.url, path, body, headers, stop, records[name], attack_rate)))
        if "slowloris" not in skip:
            records["slowloris"] = Recorder()
            threads.append(threading.Thread(target=run_slowloris, daemon=True,
                                            args=(server.port, slowloris_sockets, stop, records["slowloris"])))
    generator = psutil.Process()  # this process: attackers, Python client, watchers (and wrk, once waited for)
    generator_before, service_before = _cpu_seconds([generator]), _cpu_seconds(server.processes())
    watch = Watch(server)
    for thread in threads:
        thread.start()
    client = normal_client(tool, server.url, seconds, rate, scratch)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    watched = watch.finish()
    generator_cpu = _cpu_seconds([generator]) - generator_before
    service_cpu = _cpu_seconds(server.processes()) - service_before
    ready = httpx.get(server.url + "/readyz", timeout=10).status_code
    return {"client": client, **watched, "ready_after": ready, "attack_rate": attack_rate,
            "load_generator_cpu_s": generator_cpu, "service_cpu_s": service_cpu,
            "attacks": {name: {"statuses": dict(r.statuses), "worst_s": r.worst_s} for name, r in records.items()}}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


PHASES = (("calm", "no attack"), ("paced", "paced attack"), ("flat_out", "attack flat out"))


def report(results: dict[str, Any]) -> str:
    phases = [results[key] for key, _ in PHASES]
    headers = ["no attack", f"attack, {results['attack_rate']:g} req/s per attacker", "attack flat out"]
    lines = [f"CPU: {results['cpu']} ({results['cores']} cores); {results['seconds']:g} s per phase; normal client: "
             f"{phases[0]['client']['tool']}, about {results['rate']:g} text requests/s; idle RSS of the process tree "
             f"{results['idle_rss_mb']:.0f} MB. The load generator (this benchmark's process) shares the CPUs with "
             "the service: its CPU seconds show how much of a slowdown is its own.", "",
             "| | " + " | ".join(headers) + " |", "| --- |" + " --- |" * len(headers)]
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("normal client requests (errors)", lambda p: f"{p['client']['requests']} ({p['client']['errors']})"),
        ("normal client p50", lambda p: f"{p['client']['p50_ms']:.1f} ms"),
        ("normal client p99", lambda p: f"{p['client']['p99_ms']:.1f} ms"),
        ("/healthz worst (polled every 50 ms)",
         lambda p: f"{p['healthz_worst_ms']:.1f} ms, {p.get('healthz_worst_at_s', float('nan')):.1f} s in"),
        ("/healthz p99", lambda p: f"{p.get('healthz_p99_ms', float('nan')):.1f} ms"),
        ("/healthz answers over 100 ms", lambda p: str(p.get("healthz_over_100ms", "—"))),
        ("/healthz failures", lambda p: str(p["healthz_failures"])),
        ("peak RSS, process tree", lambda p: f"{p['peak_rss_tree_mb']:.0f} MB"),
        ("load generator CPU (this process)", lambda p: f"{p['load_generator_cpu_s']:.1f} s"),
        ("service CPU (process tree)", lambda p: f"{p['service_cpu_s']:.1f} s"),
        ("/readyz after the phase", lambda p: str(p["ready_after"])),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(phase) for phase in phases) + " |")
    lines += ["", "| attack | " + " | ".join(f"{h}: answers by status (worst time)" for h in headers[1:]) + " |",
              "| --- | --- | --- |"]
    for name in phases[2]["attacks"]:
        cells = []
        for phase in phases[1:]:
            outcome = phase["attacks"][name]
            statuses = ", ".join(f"{status} × {count}" for status, count in sorted(outcome["statuses"].items()))
            cells.append(f"{statuses} ({outcome['worst_s']:.2f} s)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each phase")
    parser.add_argument("--rate", type=float, default=20, help="the normal client's requests per second")
    parser.add_argument("--attack-rate", type=float, default=2,
                        help="requests per second of each attacker in the paced phase (0: flat out)")
    parser.add_argument("--slowloris", type=int, default=50, help="slowloris sockets kept open")
    parser.add_argument("--skip", default="", help="comma-separated attacks to leave out (to see what one costs)")
    parser.add_argument("--model-dir", default=str(ROOT / "checkpoints"))
    parser.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "hardening" / "RESULTS"))
    args = parser.parse_args(argv)
    if args.attack_rate < 0:
        parser.error("--attack-rate must be 0 (flat out) or more")
    tool = args.tool if args.tool != "auto" else ("wrk" if shutil.which("wrk") else "python")
    with tempfile.TemporaryDirectory() as scratch:
        env = {"MODEL_DIR": args.model_dir, "API_KEYS": API_KEY}
        server = harness.start_service("hardening", env, Path(scratch))
        try:
            for text in TEXTS * 5:  # past the first texts' one-off costs (the tokenizer processes starting)
                httpx.post(server.url + "/v1/text/classify", json={"text": text}, headers={"X-API-Key": API_KEY},
                           timeout=60)
            time.sleep(3)
            idle = sum(p.memory_info().rss for p in server.processes()) / 2**20
            phases = {}
            for key, attack_rate in (("calm", None), ("paced", args.attack_rate), ("flat_out", 0.0)):
                phases[key] = run_phase(server, tool, args.seconds, args.rate, Path(scratch), attack_rate,
                                        args.slowloris, frozenset(filter(None, args.skip.split(","))))
        finally:
            server.stop()
    results = {"cpu": cpu_model(), "cores": psutil.cpu_count(), "seconds": args.seconds, "rate": args.rate,
               "attack_rate": args.attack_rate, "idle_rss_mb": idle, **phases}
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    output.with_suffix(".md").write_text("# Hardening benchmark\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
