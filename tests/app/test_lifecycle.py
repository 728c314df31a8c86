"""Start-up, readiness and graceful drain of a real uvicorn process."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from servicekit import metric, save_image_model, wait_for_metric

from app.lifecycle import warmup_batch_sizes


def test_ready_only_after_loading_and_drains_on_sigterm(start_server, tmp_path: Path, jpegs: list[bytes]) -> None:
    gate = tmp_path / "gate"
    save_image_model(tmp_path / "models", "gated-probe", "probe", {"num_classes": 10, "load_gate": str(gate)})
    save_image_model(tmp_path / "models", "busy-probe", "probe", {"num_classes": 10, "sleep_s": 3.0})
    server = start_server({"MODEL_DIR": str(tmp_path / "models"), "WARMUP": "false", "REQUEST_TIMEOUT": "30",
                           "DRAIN_TIMEOUT": "30"}, probe=True)
    server.wait_alive()
    starting = httpx.get(server.url + "/readyz")  # loading waits for the gate file
    assert starting.status_code == 503 and starting.json()["status"] == "starting"
    early = httpx.post(server.url + "/v1/image/classify", files=[("file", ("a.jpg", jpegs[0], "image/jpeg"))])
    assert early.status_code == 503
    assert early.json()["detail"] == "the models are still loading; try again shortly"
    gate.touch()
    server.wait_ready()

    results: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: results.append(httpx.post(
        server.url + "/v1/image/classify", params={"model": "busy-probe"},
        files=[("file", ("a.jpg", jpegs[0], "image/jpeg"))], timeout=60)))
    slow.start()
    wait_for_metric(server.url, "crossmodal_queue_wait_seconds_count", 1, {"model": "busy-probe"})  # 3 s batch runs
    server.process.send_signal(signal.SIGTERM)
    until = time.monotonic() + 30
    while (draining := httpx.get(server.url + "/readyz")).status_code == 200 and time.monotonic() < until:
        time.sleep(0.02)
    assert draining.status_code == 503 and draining.json()["status"] == "draining"
    refused = httpx.post(server.url + "/v1/image/classify", files=[("file", ("a.jpg", jpegs[0], "image/jpeg"))])
    assert refused.status_code == 503 and refused.json()["detail"] == "the server is shutting down"
    slow.join(timeout=60)
    assert results and results[0].status_code == 200, results
    server.process.wait(timeout=60)
    assert "drained; shutting down" in server.logs()


@pytest.mark.parametrize(("processes", "tokenised_by_warm_up"), [("1", 0), ("0", 1)])
def test_warm_up_tokenises_in_the_service_only_without_tokenizer_processes(
        start_server, model_dir: Path, processes: str, tokenised_by_warm_up: int) -> None:
    """Tokenizer processes load their encoders (and import spaCy) for themselves, beside the warm-up:
    readiness does not wait for the service process to do it too."""
    server = start_server({"MODEL_DIR": str(model_dir), "TOKENIZER_PROCESSES": processes})
    server.wait_ready()
    assert metric(server.url, "crossmodal_texts_tokenised_total", {"where": "thread"}) == tokenised_by_warm_up


def test_the_loaded_heap_is_frozen_before_ready(client: httpx.Client, main_server) -> None:
    """The models and the web stack are out of the cyclic collector's reach once ready: a full
    collection then walks only what requests allocate, not the 200,000 objects of the loaded service."""
    assert client.get("/readyz").status_code == 200
    assert metric(main_server.url, "crossmodal_gc_frozen_objects") > 50_000


def test_start_fails_clearly_without_a_model_directory(start_server, tmp_path: Path) -> None:
    server = start_server({"MODEL_DIR": str(tmp_path / "missing")})
    assert server.process.wait(timeout=240) != 0
    assert f"MODEL_DIR '{tmp_path / 'missing'}' is not a directory" in server.logs()


def test_warm_up_runs_the_largest_batch_only_on_a_gpu() -> None:
    """On the CPU a new batch size costs no more the first time: warming the largest only delays readiness."""
    assert warmup_batch_sizes(torch.device("cpu"), 32) == [1, 2]
    assert warmup_batch_sizes(torch.device("cpu"), 1) == [1]
    assert warmup_batch_sizes(torch.device("cuda"), 32) == [1, 32]


def test_models_turn_torchscript_after_ready_with_the_same_answers(
        start_server, model_dir: Path, jpegs: list[bytes]) -> None:
    """Readiness does not wait for the traces (TRACE_MODELS): they are built after it, then the
    checked TorchScript forward takes over, with the same probabilities."""
    server = start_server({"MODEL_DIR": str(model_dir), "TOKENIZER_PROCESSES": "0"})
    server.wait_ready()

    def classify() -> dict[str, float]:
        response = httpx.post(server.url + "/v1/image/classify", params={"model": "tiny-fastconv"},
                              files=[("file", ("a.jpg", jpegs[0], "image/jpeg"))])
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["probabilities"]

    first = classify()
    until = time.monotonic() + 60
    while "TorchScript forwards of" not in (logs := server.logs()):
        assert time.monotonic() < until, logs
        time.sleep(0.05)
    assert logs.index("ready after") < logs.index("TorchScript forwards of tiny-fastconv, tiny-lenet in use")
    runtimes = {name: httpx.get(f"{server.url}/v1/models/{name}").json()["runtime"]
                for name in ("tiny-fastconv", "tiny-lenet", "tiny-text")}
    assert runtimes == {"tiny-fastconv": "torchscript", "tiny-lenet": "torchscript",
                        "tiny-text": "eager"}  # a trunk: no TorchScript forward
    assert classify() == pytest.approx(first, abs=1e-5)
