"""The commands the containers run, run here: the serving entry point and the readiness health checks."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_support import ROOT, Dockerfile

SERVE_SCRIPT = ROOT / "deploy" / "docker" / "serve.sh"


@pytest.fixture()
def fake_python(tmp_path: Path) -> Path:
    """A `python3` on PATH that prints its PID and arguments as JSON instead of serving."""
    script = tmp_path / "bin" / "python3"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps([os.getpid(), sys.argv[1:]]))\n")
    script.chmod(0o755)
    return script.parent


def _serve(fake_python: Path, **env: str) -> tuple[subprocess.Popen[str], str, str]:
    environment = {"PATH": f"{fake_python}{os.pathsep}{os.environ['PATH']}", **env}
    process = subprocess.Popen(
        ["sh", str(SERVE_SCRIPT)], env=environment, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = process.communicate(timeout=30)
    return process, stdout, stderr


def _serve_with(fake_python: Path, arguments: list[str]) -> tuple[subprocess.Popen[str], str, str]:
    environment = {"PATH": f"{fake_python}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(["sh", str(SERVE_SCRIPT), *arguments], env=environment, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=30)
    return process, stdout, stderr


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_entry_point_execs_the_service_launcher_on_the_configured_port(fake_python: Path) -> None:
    process, stdout, stderr = _serve(fake_python, PORT="9123")
    assert process.returncode == 0, stderr
    pid, argv = json.loads(stdout)
    assert pid == process.pid, "exec: the service replaces the shell and receives SIGTERM itself"
    assert argv[:2] == ["-m", "app.serve"], "one launcher (app/serve.py) for make serve, the image and benchmarks"
    assert _option(argv, "--host") == "0.0.0.0" and _option(argv, "--port") == "9123"


def test_entry_point_passes_its_arguments_to_the_launcher(fake_python: Path) -> None:
    process, stdout, stderr = _serve_with(fake_python, ["--root-path", "/api", "--forwarded-allow-ips", "10.0.0.1",
                                                        "--no-proxy-headers"])
    assert process.returncode == 0, stderr
    _, argv = json.loads(stdout)
    assert argv[-5:] == ["--root-path", "/api", "--forwarded-allow-ips", "10.0.0.1", "--no-proxy-headers"]


def test_launcher_hands_proxy_flags_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from app import serve

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append({"app": app, **options}))
    serve.main(["--root-path", "/api", "--forwarded-allow-ips", "10.0.0.1,10.0.0.2", "--no-proxy-headers",
                "--port", "9001"])
    assert calls[0]["app"] == "app.main:app" and calls[0]["port"] == 9001
    assert calls[0]["root_path"] == "/api" and calls[0]["forwarded_allow_ips"] == "10.0.0.1,10.0.0.2"
    assert calls[0]["proxy_headers"] is False
    serve.main([])
    assert calls[1]["root_path"] == "" and calls[1]["proxy_headers"] is True and calls[1]["forwarded_allow_ips"] is None


def test_launcher_refuses_flags_it_does_not_know() -> None:
    from app.serve import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--workers", "4"])


def test_launcher_refuses_to_start_when_uvicorn_lacks_what_it_relies_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from app import serve

    monkeypatch.setattr(serve, "missing_internals", lambda: ["HttpToolsProtocol.cycle"])
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("started anyway"))
    with pytest.raises(SystemExit, match=r"lacks what the service relies on: HttpToolsProtocol\.cycle\. Install"):
        serve.main([])


def test_makefile_and_benchmarks_launch_the_service_the_same_way() -> None:
    assert "$(PY) -m app.serve --host $(HOST) --port $(PORT)" in (ROOT / "Makefile").read_text()
    harness = (ROOT / "benchmarks" / "serving" / "harness.py").read_text()
    assert '[sys.executable, "-m", "app.serve",' in harness


def test_launcher_runs_one_uvicorn_process_with_connection_limits() -> None:
    from app.serve import SHUTDOWN_AFTER_DRAIN_S, uvicorn_options
    from app.settings import Settings

    settings = Settings(max_connections=100, keep_alive_timeout=7, max_header_bytes=4096, header_timeout=3)
    options = uvicorn_options(settings)
    assert options["workers"] == 1 and options["server_header"] is False
    assert options["limit_concurrency"] is None, "uvicorn's 503 would fail /healthz: the app limits requests instead"
    assert options["timeout_keep_alive"] == 7
    assert options["h11_max_incomplete_event_size"] == 4096
    assert options["timeout_graceful_shutdown"] == SHUTDOWN_AFTER_DRAIN_S <= 10, "the drain came first"
    assert isinstance(options["http"], type), "the guarded httptools protocol (header deadline and size)"


def test_launcher_refuses_invalid_settings_with_a_clear_message() -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "DRAIN_TIMEOUT": "soon"}
    result = subprocess.run([sys.executable, "-m", "app.serve"], env=environment, capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode != 0
    assert "crossmodal: invalid settings" in result.stderr and "drain_timeout" in result.stderr


# ---- health checks -----------------------------------------------------------------------------------------


class _Readiness(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def readiness_server() -> Iterator[tuple[int, type[_Readiness]]]:
    handler = type("Handler", (_Readiness,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def _health_check_commands(dockerfile: Dockerfile, compose_config: Any) -> dict[str, list[str]]:
    healthcheck = dockerfile.stages["serve"].args("HEALTHCHECK")[0]
    return {
        "Dockerfile": json.loads(healthcheck.partition(" CMD ")[2]),
        "docker-compose.yml": compose_config()["services"]["api"]["healthcheck"]["test"][1:],
    }


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_health_check_passes_only_when_readyz_answers_200(
    dockerfile: Dockerfile, compose_config: Any, readiness_server: tuple[int, type], source: str
) -> None:
    port, handler = readiness_server
    argv = _health_check_commands(dockerfile, compose_config)[source]
    argv = [sys.executable if a == "python3" else a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in argv]
    environment = {**os.environ, "PORT": str(port)}
    for status, healthy in ((200, True), (503, False)):
        handler.status = status
        result = subprocess.run(argv, env=environment, capture_output=True, timeout=30)
        assert (result.returncode == 0) == healthy, (status, result.stderr)


# ---- the real service through the entry point ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def tiny_model_dir(tmp_path: Path) -> Path:
    from models import build_model
    from models.checkpoint import new_manifest, save_checkpoint

    model = build_model("lenet", {"num_classes": 3})
    manifest = new_manifest(
        "tiny",
        "image",
        "lenet",
        model.config,
        classes=["a", "b", "c"],
        preprocessing={"kind": "image", "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
    )
    save_checkpoint(tmp_path / "models" / "tiny", model, manifest)
    return tmp_path / "models"


@pytest.mark.slow
def test_entry_point_serves_turns_healthy_and_stops_on_sigterm(
    dockerfile: Dockerfile, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What `docker run` does with the serving image, minus Docker: CMD, HEALTHCHECK, `docker stop`."""
    if not (ROOT / "app" / "main.py").is_file():
        pytest.skip("the service (app/main.py) is not there yet")
    port, drain = _free_port(), 5
    health_check = json.loads(dockerfile.stages["serve"].args("HEALTHCHECK")[0].partition(" CMD ")[2])
    health_check[0] = sys.executable
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "MODEL_DIR": str(tiny_model_dir),
        "DEVICE": "cpu",
        "PORT": str(port),
        "DRAIN_TIMEOUT": str(drain),
    }
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(["sh", str(SERVE_SCRIPT)], env=environment, cwd=tmp_path, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(health_check, env=environment, capture_output=True, timeout=30).returncode != 0:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "not healthy within 60 s"
            time.sleep(0.25)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=drain + 10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    # 0 as PID 1 in a container; here uvicorn re-raises the SIGTERM it handled once it has shut down.
    assert returncode in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()
    assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
