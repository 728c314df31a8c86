"""Reloading models while serving (SIGHUP and /admin), model versions, and the admin endpoints' guards.

One real uvicorn process for the module, over its own MODEL_DIR, which the tests rewrite as they go:
``stable`` (the default image model), ``changing`` (rewritten in place), ``words`` (a text model,
tokenised in a tokenizer process). A valid checkpoint ``outside`` lies beside MODEL_DIR, never inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import http.client
import json
import os
import shutil
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import ValidationError
from servicekit import (
    API_KEY,
    CLASSES,
    IMAGE_PREPROCESSING,
    Server,
    StubRunner,
    metric,
    save_image_model,
    serving,
)
from torch import nn

from app.lifecycle import STARTING, Service
from app.registry import ServedModel
from app.settings import Settings
from app.worker import InferenceWorker
from models import build_model
from models.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, Manifest, load_checkpoint, new_manifest, save_checkpoint

ADMIN_TOKEN = "admin-token-for-the-tests-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TEXT_CLASSES = ["space", "graphics", "hockey"]
TEXT = "the shuttle launch was delayed by the goalie"


def _save_text_model(directory: Path, name: str, corpus: list[str], seed: int) -> None:
    from models.text_encoding import TextPreprocessing, Vocabulary, tokenize

    preprocessing = TextPreprocessing(max_tokens=64)
    vocabulary = Vocabulary.build(tokenize(corpus, preprocessing), min_freq=1)
    torch.manual_seed(seed)
    config = {"num_classes": 3, "modalities": ["text"], "dim": 16, "depth": 1, "heads": 2,
              "vocab_size": len(vocabulary), "max_text_tokens": 64}
    model = build_model("trunk", config)
    manifest = new_manifest(name, "text", "trunk", model.config, classes=TEXT_CLASSES,
                            preprocessing=preprocessing.to_dict())
    save_checkpoint(directory / name, model, manifest, extra_files={"vocab.json": vocabulary.to_json_bytes()})


def _save_version(model_dir: Path, name: str, version: str, classes: list[str] = CLASSES) -> None:
    """An untrained LeNet as ``MODEL_DIR/name/version`` (its manifest names the model ``name``)."""
    model = build_model("lenet", {"num_classes": 10})
    manifest = new_manifest(name, "image", "lenet", {"num_classes": 10}, classes=classes,
                            preprocessing=IMAGE_PREPROCESSING)
    save_checkpoint(model_dir / name / version, model, manifest)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reload")
    model_dir = root / "models"
    save_image_model(model_dir, "stable", "lenet", {"num_classes": 10})
    save_image_model(model_dir, "changing", "fastconv", {"num_classes": 10, "widths": [8, 16, 16]})
    _save_text_model(model_dir, "words", ["the shuttle launch was delayed", "the goalie made saves"], seed=0)
    save_image_model(root, "outside", "lenet", {"num_classes": 10})
    return model_dir


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MODEL_DIR": str(repo), "ADMIN_TOKEN": ADMIN_TOKEN, "API_KEYS": API_KEY, "DEFAULT_IMAGE_MODEL": "stable",
           "TOKENIZER_PROCESSES": "1", "PRECISION": "fp32", "MAX_WAIT_MS": "5"}
    with serving(tmp_path_factory.mktemp("reload-server") / "server.log", env) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as session:
        yield session


def _classify(client: httpx.Client, jpeg: bytes, model: str, version: str | None = None) -> httpx.Response:
    params = {"model": model, **({"version": version} if version is not None else {})}
    return client.post("/v1/image/classify", params=params, files=[("file", ("a.jpg", jpeg, "image/jpeg"))])


def _probabilities(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return list(response.json()["predictions"][0]["probabilities"].values())


def _admin(client: httpx.Client, method: str, path: str) -> httpx.Response:
    return client.request(method, path, headers=ADMIN)


def _models(client: httpx.Client) -> dict[str, dict]:
    return {model["name"]: model for model in client.get("/v1/models").json()["models"]}


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    until = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > until:
            raise TimeoutError(what)
        time.sleep(0.05)


def _weights_sha(directory: Path) -> str:
    return json.loads((directory / MANIFEST_FILE).read_text())["weights_sha256"]


@contextlib.contextmanager
def _watching_readiness(server: Server) -> Iterator[list[int]]:
    """/readyz polled throughout the block; yields the statuses seen (checked by the caller)."""
    statuses: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            statuses.append(httpx.get(server.url + "/readyz", timeout=10).status_code)
            time.sleep(0.02)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        yield statuses
    finally:
        done.set()
        thread.join()


def _expected_text_probabilities(directory: Path, text: str) -> list[float]:
    """What the checkpoint says for ``text``, computed here with its own encoder (fp32, eager)."""
    from models.text_encoding import load_text_encoder

    checkpoint = load_checkpoint(directory)
    encoder = load_text_encoder(str(directory), checkpoint.manifest)
    ids = torch.tensor(encoder.ids(encoder.tokenize([text]))[0])
    with torch.inference_mode():
        logits = checkpoint.model(token_ids=ids[None])  # (1, classes)
    return torch.softmax(logits / checkpoint.manifest.temperature, dim=-1)[0].tolist()


# ---- the admin endpoints: off by default, their own token, only names in MODEL_DIR -----------------


def test_admin_endpoints_are_not_served_without_a_token(tmp_path: Path) -> None:
    from app.main import create_app

    async def ask(app: object) -> tuple[int, dict]:
        transport = httpx.ASGITransport(app=app)  # no lifespan: nothing loads, routing alone answers
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as session:
            return (await session.post("/admin/reload")).status_code, (await session.get("/openapi.json")).json()

    status, openapi = asyncio.run(ask(create_app(Settings(model_dir=tmp_path))))
    assert status == 404 and not any(path.startswith("/admin") for path in openapi["paths"])
    status, openapi = asyncio.run(ask(create_app(Settings(model_dir=tmp_path, admin_token=ADMIN_TOKEN))))
    assert status == 401 and not any(path.startswith("/admin") for path in openapi["paths"])


@pytest.mark.parametrize(("values", "message"), [
    ({"admin_token": "short"}, "ADMIN_TOKEN must be at least 16 characters"),
    ({"admin_token": ADMIN_TOKEN, "api_keys": f"k1,{ADMIN_TOKEN}"}, "ADMIN_TOKEN must differ from every key")])
def test_weak_admin_tokens_are_refused_at_start(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/admin/reload"), ("POST", "/admin/models/stable/load"), ("DELETE", "/admin/models/stable")])
def test_admin_endpoints_need_the_admin_token(client: httpx.Client, method: str, path: str) -> None:
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong-token-0123456789"}, 403),
                            ({"Authorization": f"Bearer {API_KEY}"}, 403), ({"X-API-Key": API_KEY}, 401),
                            ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 403)):
        response = httpx.request(method, client.base_url.join(path), headers=headers, timeout=30)
        assert response.status_code == status, (headers, response.text)
    assert httpx.get(client.base_url.join("/v1/models"), headers=ADMIN).status_code == 401  # nor is it an API key
    assert "stable" in _models(client)


def _raw(server: Server, method: str, target: str) -> int:
    """The status for a request target sent exactly as written (httpx would normalise dot segments)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, target, headers=ADMIN)
        return connection.getresponse().status
    finally:
        connection.close()


def test_hostile_names_are_refused_and_nothing_outside_model_dir_is_read(
        server: Server, client: httpx.Client, repo: Path) -> None:
    outside = repo.parent / "outside"
    (repo / "outside-link").symlink_to(outside, target_is_directory=True)
    (repo / ".hidden").mkdir()
    before = _models(client)
    stamps = {path.name: path.stat().st_mtime_ns for path in outside.iterdir()}
    names = ["..", "%2e%2e", "%2E%2E", ".", "a/b", "a%2Fb", "%2Fetc%2Fpasswd", "/etc", "..%2Foutside",
             "%2e%2e%2foutside", "http:%2F%2Fexample.com%2Fm", "https:example.com", "~root", ".hidden",
             "a" * 129, "a" * 300, "outside-link", "nope", "stable%00", "stable%20", "%C3%A9t%C3%A9"]
    for name in names:
        for method, target in (("POST", f"/admin/models/{name}/load"), ("DELETE", f"/admin/models/{name}")):
            status = _raw(server, method, target)
            assert 400 <= status < 500, (method, target, status)
    try:
        assert _models(client) == before
        assert {path.name: path.stat().st_mtime_ns for path in outside.iterdir()} == stamps
        assert "loaded outside" not in server.logs()
        report = _admin(client, "POST", "/admin/reload").json()  # a rescan skips the link that leads out
        assert "outside-link" not in json.dumps(report) and "outside" not in _models(client)
    finally:
        (repo / "outside-link").unlink()
        (repo / ".hidden").rmdir()


# ---- reloading ------------------------------------------------------------------------------------


def test_sighup_loads_a_new_directory_and_changed_ones_while_ready(
        server: Server, client: httpx.Client, repo: Path, jpegs: list[bytes]) -> None:
    image_before = _probabilities(_classify(client, jpegs[0], "changing"))
    text_before = _probabilities(client.post("/v1/text/classify", params={"model": "words"}, json={"text": TEXT}))
    loads = metric(server.url, "crossmodal_model_reloads_total", {"directory": "changing", "outcome": "loaded"})
    save_image_model(repo, "changing", "fastconv", {"num_classes": 10, "widths": [8, 16, 16]})  # new weights
    save_image_model(repo, "fresh", "lenet", {"num_classes": 10})
    # a new vocabulary too: a tokenizer process that kept the old one would send the new model wrong ids
    _save_text_model(repo, "words", ["launch shuttle delayed", "goalie saves the made was by"], seed=1)
    with _watching_readiness(server) as readiness:
        os.kill(server.process.pid, signal.SIGHUP)
        _wait_until(lambda: metric(server.url, "crossmodal_model_reloads_total",
                                   {"directory": "changing", "outcome": "loaded"}) > loads, "no reload after SIGHUP")
        _wait_until(lambda: "fresh" in _models(client), "the new model was not loaded")
    assert readiness and set(readiness) == {200}
    assert server.process.poll() is None
    models = _models(client)
    assert models["changing"]["weights_sha256"] == _weights_sha(repo / "changing")
    assert models["words"]["weights_sha256"] == _weights_sha(repo / "words")
    image_after = _probabilities(_classify(client, jpegs[0], "changing"))
    assert image_after != pytest.approx(image_before, abs=1e-6)
    assert _probabilities(_classify(client, jpegs[0], "fresh"))
    text_after = _probabilities(client.post("/v1/text/classify", params={"model": "words"}, json={"text": TEXT}))
    assert text_after == pytest.approx(_expected_text_probabilities(repo / "words", TEXT), abs=1e-5)
    assert text_after != pytest.approx(text_before, abs=1e-6)
    assert "SIGHUP: reloaded MODEL_DIR" in server.logs()


def test_admin_loads_unloads_and_rescans(server: Server, client: httpx.Client, repo: Path, jpegs: list[bytes]) -> None:
    save_image_model(repo, "extra", "lenet", {"num_classes": 10})
    loaded = _admin(client, "POST", "/admin/models/extra/load")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() == {"directory": "extra", "outcome": "loaded", "model": "extra", "versions": ["1"],
                             "default_version": "1", "reason": None}
    assert _probabilities(_classify(client, jpegs[0], "extra"))
    again = _admin(client, "POST", "/admin/models/extra/load")  # unchanged on disk: loaded again all the same
    assert again.status_code == 200 and again.json()["outcome"] == "loaded"

    unloaded = _admin(client, "DELETE", "/admin/models/extra")
    assert unloaded.status_code == 200 and unloaded.json()["outcome"] == "unloaded"
    assert _classify(client, jpegs[0], "extra").status_code == 404
    assert _admin(client, "DELETE", "/admin/models/extra").json() == {
        "detail": "no model is loaded from the directory 'extra'"}
    refused = _admin(client, "DELETE", "/admin/models/stable")
    assert refused.status_code == 409 and "DEFAULT_IMAGE_MODEL" in refused.json()["detail"]
    assert "stable" in _models(client)

    report = _admin(client, "POST", "/admin/reload").json()  # the directory is still there: loaded again
    assert [entry["directory"] for entry in report["loaded"]] == ["extra"]
    assert "stable" in report["unchanged"] and report["failed"] == report["unloaded"] == []
    shutil.rmtree(repo / "extra")
    report = _admin(client, "POST", "/admin/reload").json()
    assert [entry["directory"] for entry in report["unloaded"]] == ["extra"] and report["loaded"] == []
    assert "extra" not in _models(client)


def _bad_safetensors(directory: Path) -> None:
    garbage = b"\xff" * 64
    (directory / WEIGHTS_FILE).write_bytes(garbage)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())  # the hash matches: the parser has to refuse it
    manifest["weights_sha256"] = hashlib.sha256(garbage).hexdigest()
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def _file_outside(directory: Path) -> None:
    content = b'{"not": "a vocabulary"}'
    (directory.parent.parent / "outside.json").write_bytes(content)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["files"] = {"../../outside.json": hashlib.sha256(content).hexdigest()}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def _wrong_classes(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["classes"] = ["cat", "dog", "bird"]  # the model has 10 outputs
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def _nonsense_calibration(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["calibration"] = {"temperature": 1.0, "top_label": {"log_top_weight": -2.0, "log_rest_weight": 1.0,
                                                               "intercept": 0.0}}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(("corrupt", "reason"), [
    (_nonsense_calibration, "calibration.top_label.log_top_weight must be positive, got -2.0"),
    (_bad_safetensors, "SafetensorError: Error while deserializing header"),
    (_file_outside, "manifest file name '../../outside.json' leads outside the checkpoint directory"),
    (_wrong_classes, "model 'victim' outputs 10 scores but its manifest lists 3 classes; it is not served")])
def test_a_corrupt_checkpoint_keeps_the_old_model_serving(
        server: Server, client: httpx.Client, repo: Path, jpegs: list[bytes],
        corrupt: Callable[[Path], None], reason: str) -> None:
    save_image_model(repo, "victim", "lenet", {"num_classes": 10})
    assert _admin(client, "POST", "/admin/models/victim/load").status_code == 200
    before = _probabilities(_classify(client, jpegs[0], "victim"))
    failures = metric(server.url, "crossmodal_model_reloads_total", {"directory": "victim", "outcome": "failed"})
    save_image_model(repo, "victim", "lenet", {"num_classes": 10})
    corrupt(repo / "victim")
    try:
        with _watching_readiness(server) as readiness:
            response = _admin(client, "POST", "/admin/models/victim/load")
            report = _admin(client, "POST", "/admin/reload").json()
        served = _probabilities(_classify(client, jpegs[0], "victim"))
    finally:
        shutil.rmtree(repo / "victim")
        _admin(client, "DELETE", "/admin/models/victim")
    assert set(readiness) == {200}
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert reason in detail and "(version 1 of 'victim' keeps serving)" in detail
    assert str(repo.parent) not in response.text and "/tmp" not in response.text
    assert [entry["directory"] for entry in report["failed"]] == ["victim"] and reason in report["failed"][0]["reason"]
    assert served == before
    assert metric(server.url, "crossmodal_model_reloads_total",
                  {"directory": "victim", "outcome": "failed"}) == failures + 2
    assert "reload of victim failed" in server.logs()


def test_a_corrupt_new_directory_is_not_loaded(client: httpx.Client, repo: Path) -> None:
    save_image_model(repo, "broken-new", "lenet", {"num_classes": 10})
    _wrong_classes(repo / "broken-new")
    try:
        response = _admin(client, "POST", "/admin/models/broken-new/load")
        assert response.status_code == 422 and response.json()["detail"].endswith("(nothing was loaded)")
        assert "broken-new" not in _models(client)
    finally:
        shutil.rmtree(repo / "broken-new")


def test_requests_in_flight_during_reloads_all_succeed(
        server: Server, client: httpx.Client, repo: Path, jpegs: list[bytes]) -> None:
    problems: list[str] = []
    answered = {"image": 0, "text": 0}
    done = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as session:
            while not done.is_set():
                try:
                    image = _classify(session, jpegs[answered["image"] % len(jpegs)], "changing")
                    text = session.post("/v1/text/classify", params={"model": "words"}, json={"text": TEXT})
                except httpx.HTTPError as error:
                    problems.append(repr(error))
                    continue
                for kind, response in (("image", image), ("text", text)):
                    if response.status_code == 200:
                        answered[kind] += 1
                    else:
                        problems.append(f"{kind}: {response.status_code} {response.text}")

    senders = [threading.Thread(target=send) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        for round_ in range(3):
            save_image_model(repo, "changing", "fastconv", {"num_classes": 10, "widths": [8, 16, 16]})
            _save_text_model(repo, "words", ["the shuttle launch", f"goalie round {round_} saves"], seed=round_ + 2)
            seen = dict(answered)
            report = _admin(client, "POST", "/admin/reload").json()
            assert sorted(entry["directory"] for entry in report["loaded"]) == ["changing", "words"], report
            _wait_until(lambda seen=seen: all(answered[kind] > seen[kind] for kind in seen), "no answers after a reload")
    finally:
        done.set()
        for sender in senders:
            sender.join()
    assert problems == []
    assert min(answered.values()) >= 3


# ---- versions -------------------------------------------------------------------------------------


def _v2_image(client: httpx.Client, path: str, jpeg: bytes) -> httpx.Response:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4 + len(jpeg)}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}).encode()
    return client.post(path, content=header + len(jpeg).to_bytes(4, "little") + jpeg,
                       headers={"Inference-Header-Content-Length": str(len(header))})


def test_versions_latest_by_default_pinned_or_asked_for(client: httpx.Client, repo: Path, jpegs: list[bytes]) -> None:
    for version in ("1", "2", "10"):
        _save_version(repo, "multi", version)
    response = _admin(client, "POST", "/admin/models/multi/load")
    assert response.status_code == 200, response.text
    assert response.json()["versions"] == ["1", "2", "10"] and response.json()["default_version"] == "10"

    assert _classify(client, jpegs[0], "multi").json()["model"] == {"name": "multi", "version": "10", "task": "image"}
    two = _classify(client, jpegs[0], "multi", "2")
    assert two.json()["model"]["version"] == "2"
    missing = _classify(client, jpegs[0], "multi", "3")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "model 'multi' has no version '3'; the loaded versions are '1', '2', '10'"
    listed = _models(client)["multi"]
    assert listed["version"] == "10" and listed["versions"] == ["1", "2", "10"]
    assert client.get("/v1/models/multi", params={"version": "1"}).json()["version"] == "1"

    assert client.get("/v2/models/multi").json()["versions"] == ["1", "2", "10"]
    assert client.get("/v2/models/multi/versions/2").json()["versions"] == ["1", "2", "10"]
    answer = _v2_image(client, "/v2/models/multi/versions/2/infer", jpegs[0])
    assert answer.status_code == 200 and answer.json()["model_version"] == "2"
    assert answer.json()["outputs"][0]["data"] == pytest.approx(_probabilities(two), abs=1e-6)
    assert _v2_image(client, "/v2/models/multi/infer", jpegs[0]).json()["model_version"] == "10"
    for path in ("/v2/models/multi/versions/9", "/v2/models/multi/versions/9/ready"):
        assert client.get(path).status_code == 404
    assert _v2_image(client, "/v2/models/multi/versions/9/infer", jpegs[0]).status_code == 404

    (repo / "multi" / "DEFAULT").write_text("2\n")
    report = _admin(client, "POST", "/admin/reload").json()
    assert [(entry["directory"], entry["default_version"]) for entry in report["loaded"]] == [("multi", "2")]
    assert _classify(client, jpegs[0], "multi").json()["model"]["version"] == "2"
    (repo / "multi" / "DEFAULT").write_text("7")
    report = _admin(client, "POST", "/admin/reload").json()
    assert report["failed"][0]["reason"].startswith("MODEL_DIR/multi/DEFAULT names no version of this model")
    assert _classify(client, jpegs[0], "multi").json()["model"]["version"] == "2"
    (repo / "multi" / "DEFAULT").unlink()
    _admin(client, "DELETE", "/admin/models/multi")


# ---- memory -------------------------------------------------------------------------------------------


def test_a_replaced_model_is_freed(tmp_path: Path) -> None:
    save_image_model(tmp_path, "m", "lenet", {"num_classes": 10})
    settings = Settings(model_dir=tmp_path, tokenizer_processes=0, warmup=False, trace_models=False)

    async def reload_once() -> tuple[str, bool]:
        service = Service(settings)
        await service.start()
        while service.phase == STARTING:
            await asyncio.sleep(0.01)
        assert service._compiling is not None and service.registry is not None
        await service._compiling
        old = weakref.ref(service.registry.get("m").model)
        try:
            outcome = await service.reloader.load("m")
            gc.collect()
            return outcome.outcome, old() is None
        finally:
            await service.stop()

    assert asyncio.run(reload_once()) == ("loaded", True)


class _Shift(nn.Module):
    def __init__(self, shift: list[float]) -> None:
        super().__init__()
        self.shift = torch.tensor(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift  # (B, 2)


def test_old_and_new_model_of_one_name_in_one_batch_each_answer_for_themselves() -> None:
    """During a swap, items of the old and the new load of a model may share a batch."""
    manifest = Manifest(name="m", task="image", architecture="x", config={}, classes=["a", "b"], preprocessing={})
    old, new = (ServedModel("m", manifest, _Shift(shift), StubRunner(), Path("."), torch.device("cpu"))
                for shift in ([0.0, 9.0], [9.0, 0.0]))

    async def scenario() -> list[list[torch.Tensor]]:
        worker = InferenceWorker(torch.device("cpu"), 8, 50, 10)
        worker.start()
        deadline = asyncio.get_running_loop().time() + 10
        try:
            return list(await asyncio.gather(worker.submit(old, [torch.zeros(2)], deadline),
                                             worker.submit(new, [torch.zeros(2)], deadline)))
        finally:
            await worker.stop(1)

    (from_old,), (from_new,) = asyncio.run(scenario())
    assert from_old.argmax().item() == 1 and from_new.argmax().item() == 0


def test_tokenizer_processes_read_a_copy_of_the_encoder_removed_with_the_model(tmp_path: Path) -> None:
    """A checkpoint rewritten in MODEL_DIR before its reload must not reach the tokenizer processes."""
    from app.registry import load_version
    from app.repository import read_model_dir
    from app.tokenizing import TokenizerPool, load_encoder

    _save_text_model(tmp_path, "words", ["the shuttle launch was delayed"], seed=0)
    found = read_model_dir(tmp_path / "words")
    assert found is not None
    served = load_version(found.versions[0], Settings(model_dir=tmp_path, warmup=False), torch.device("cpu"),
                          TokenizerPool(1))  # never started: only its process count matters here
    source = served.runner.source
    assert source is not None and source.checkpoint_dir == str(tmp_path / "words")
    copy = Path(source.copy_dir)
    assert copy.is_dir() and not copy.is_relative_to(tmp_path)
    _save_text_model(tmp_path, "words", ["an entirely different vocabulary"], seed=1)
    encoder = load_encoder(source)  # as a tokenizer process loads it
    assert encoder.ids(encoder.tokenize([TEXT])) == served.runner.encoder.ids(served.runner.encoder.tokenize([TEXT]))
    del served, encoder
    gc.collect()
    assert not copy.exists()
