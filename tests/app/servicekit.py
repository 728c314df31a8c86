"""Helpers for the service tests: a real uvicorn subprocess on a free port, image encoding."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-1"


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A uvicorn subprocess serving ``app.main:app`` on a free port."""

    def __init__(self, log_path: Path, env: dict[str, str], probe: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        entry = [str(Path(__file__).parent / "probe_server.py")] if probe else ["-m", "uvicorn"]
        command = [sys.executable, *entry, "app.main:app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--timeout-graceful-shutdown", "10", "--no-access-log"]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_alive(self, timeout: float = 60) -> None:
        self._wait("/healthz", timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        self._wait("/readyz", timeout)

    def _wait(self, path: str, timeout: float) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{path} not 200 after {timeout} s:\n{self.logs()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode
