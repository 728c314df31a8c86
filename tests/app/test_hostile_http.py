"""Hostile input at the HTTP boundary, against the service as it ships (``python -m app.serve``).

Every attack must be refused quickly (well within 2 s) with a clear 4xx, never a 5xx or a hang, while
``/healthz`` keeps answering; after each one the service is ready and answers correctly.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servicekit import API_KEY, Server, serving

from app.errors import scrub_paths
from app.routes.health import public_reason
from app.settings import Settings

FAST_S = 2.0
HEADERS = {"X-API-Key": API_KEY}
MAX_JSON_BYTES = 2 * 1024 * 1024  # below the default, so the attacks stay quick to send
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MODEL_DIR": str(model_dir), "API_KEYS": API_KEY, "MAX_ITEMS_PER_REQUEST": "8", "MAX_TEXT_CHARS": "500",
           "TOKENIZER_PROCESSES": "0", "HEADER_TIMEOUT": "1", "BODY_TIMEOUT": "1", "MAX_HEADER_BYTES": "8192",
           "WARMUP": "false", "MAX_JSON_BYTES": str(MAX_JSON_BYTES), "MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    with serving(tmp_path_factory.mktemp("hostile") / "server.log", env, shipped=True) as server:
        yield server


@pytest.fixture(autouse=True)
def still_serving(server: Server) -> Iterator[None]:
    """After every attack: ready, and an honest request gets its answer."""
    yield
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200, server.logs()[-2000:]
    response = httpx.post(server.url + "/v1/text/classify", json={"texts": ["the goalie made saves", "X11"]},
                          headers=HEADERS, timeout=10)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 2


def _rss(server: Server) -> int:
    return int(psutil.Process(server.process.pid).memory_info().rss)


def _post(server: Server, path: str, **kwargs: object) -> tuple[httpx.Response, float]:
    headers = {**HEADERS, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    started = time.perf_counter()
    response = httpx.post(server.url + path, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]
    return response, time.perf_counter() - started


def _raw(server: Server, data: bytes, wait_s: float = 5.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``wait_s``)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received, time.perf_counter() - started


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _detail(raw: bytes) -> str:
    return str(json.loads(raw.partition(b"\r\n\r\n")[2])["detail"])


# ---- JSON bodies --------------------------------------------------------------------------------------------


def test_a_json_body_over_the_json_limit_is_refused_from_its_length(server: Server) -> None:
    body = b'{"texts": [' + b"1," * 2_000_000 + b'1]}'  # 4 MB, far below the upload limit
    response, elapsed = _post(server, "/v1/text/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and elapsed < FAST_S
    assert response.json()["detail"] == f"request body is larger than the limit of {MAX_JSON_BYTES:,} bytes (MAX_JSON_BYTES)"


def test_a_huge_item_array_is_counted_before_it_is_validated(server: Server) -> None:
    before = _rss(server)
    body = b'{"texts": [' + b"1," * (MAX_JSON_BYTES // 2 - 100) + b'1]}'  # just under the limit: ~1M items
    response, elapsed = _post(server, "/v1/text/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and elapsed < FAST_S
    detail = response.json()["detail"]
    assert detail.startswith("too many texts: more than ") and detail.endswith(
        " (at most 8 per request, MAX_ITEMS_PER_REQUEST)")
    assert _rss(server) - before < 300 * 2**20


def test_many_unknown_keys_are_refused_without_an_error_each(server: Server) -> None:
    body = json.dumps({f"k{i}": 1 for i in range(150_000)}).encode()
    assert len(body) < MAX_JSON_BYTES
    response, elapsed = _post(server, "/v1/text/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and elapsed < FAST_S
    assert response.json()["detail"] == ("more than 10 unknown fields in the request body ('k0', 'k1', 'k2', …); it "
                                         "takes only 'texts', 'text'")


def test_a_top_level_array_of_many_values_is_refused(server: Server) -> None:
    body = b"[" + b"1," * 900_000 + b"1]"
    response, elapsed = _post(server, "/v1/text/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and elapsed < FAST_S
    assert response.json()["detail"] == ("the request body holds too many JSON values for a request of at most 8 "
                                         "items (MAX_ITEMS_PER_REQUEST)")


def test_a_huge_array_nested_in_an_item_is_refused(server: Server) -> None:
    body = b'{"texts": [[' + b"1," * 900_000 + b"1]]}"
    response, elapsed = _post(server, "/v1/text/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and elapsed < FAST_S


def test_json_nested_too_deeply_is_refused(server: Server) -> None:
    body = b'{"texts": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}"
    response, elapsed = _post(server, "/v1/text/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and elapsed < FAST_S
    assert response.json()["detail"] == "request body is not valid JSON (nested too deeply)"


def test_a_few_bad_items_are_each_reported(server: Server) -> None:
    response, elapsed = _post(server, "/v1/text/classify", json={"texts": [[[[1]]], 2]})
    assert response.status_code == 422 and elapsed < FAST_S
    assert response.json()["detail"] == "texts.0: Input should be a valid string; texts.1: Input should be a valid string"


@pytest.mark.parametrize(("path", "content_type", "message"), [
    ("/v1/text/classify", "text/plain", "the request body must be application/json, not 'text/plain' (Content-Type header)"),
    ("/v1/image/classify", "application/json",
     "the request body must be multipart/form-data or application/x-www-form-urlencoded, not 'application/json' "
     "(Content-Type header)"),
    ("/v1/text/classify", None,
     "the request body must be application/json, sent with that Content-Type header; it had none"),
])
def test_a_body_of_the_wrong_content_type_is_refused_before_reading(server: Server, path: str,
                                                                    content_type: str | None, message: str) -> None:
    # 415, not FastAPI's 422: JSON routes take only JSON bodies that say so (README, error list)
    headers = {"Content-Type": content_type} if content_type else {}
    response, elapsed = _post(server, path, content=b'{"texts": ["hello"]}', headers=headers)
    assert response.status_code == 415 and elapsed < FAST_S
    assert response.json()["detail"] == message


# ---- lengths and streaming -----------------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(server: Server) -> None:
    head = (f"POST /v1/image/classify HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000000\r\n\r\n").encode()
    raw, elapsed = _raw(server, head)
    assert _status(raw) == 413 and elapsed < FAST_S
    assert _detail(raw) == "request body is larger than the limit of 16,777,216 bytes (MAX_UPLOAD_BYTES)"


def test_a_content_length_that_is_not_a_number_is_refused(server: Server) -> None:
    raw, elapsed = _raw(server, b"POST /v1/text/classify HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n")
    assert _status(raw) == 400 and elapsed < FAST_S


def test_a_chunked_body_is_cut_off_at_the_limit(server: Server) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
        yield b'{"texts": ["'
        for _ in range(MAX_JSON_BYTES // 65536 + 8):
            yield b"a" * 65536
        yield b'"]}'

    response, elapsed = _post(server, "/v1/text/classify", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and elapsed < FAST_S
    assert "MAX_JSON_BYTES" in response.json()["detail"]


def test_a_body_that_stops_arriving_times_out(server: Server) -> None:
    head = (f"POST /v1/text/classify HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
            'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"texts": ["').encode()
    raw, elapsed = _raw(server, head)  # 12 of 1,000 bytes, then nothing: BODY_TIMEOUT=1
    assert _status(raw) == 408 and elapsed < FAST_S
    assert _detail(raw) == "no part of the request body arrived for 1 s (BODY_TIMEOUT)"


def test_a_slow_upload_that_keeps_moving_is_answered(server: Server) -> None:
    body = json.dumps({"texts": ["the goalie made saves"]}).encode() + b" " * 2000
    head = (f"POST /v1/text/classify HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        for start in range(0, len(body), len(body) // 6 + 1):  # BODY_TIMEOUT=1: 2.8 s in all, a part every 0.4 s
            time.sleep(0.4)
            sock.sendall(body[start:start + len(body) // 6 + 1])
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert time.perf_counter() - started > 2 * 1.0, "the upload took longer than BODY_TIMEOUT in all"
    assert _status(raw) == 200, raw[:300]


# ---- auth first ----------------------------------------------------------------------------------------------


def test_an_unauthenticated_big_body_is_refused_before_it_is_read(server: Server) -> None:
    # only the head of a 2 MB request: a 401 that arrives proves the body was never waited for
    head = (b"POST /v1/text/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2000000\r\n\r\n")
    raw, elapsed = _raw(server, head)
    assert _status(raw) == 401 and elapsed < FAST_S
    assert _detail(raw) == "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    assert b"www-authenticate: Bearer" in raw.lower().replace(b"bearer", b"Bearer")


# ---- forms ---------------------------------------------------------------------------------------------------


def test_a_thousand_form_fields_are_refused(server: Server) -> None:
    response, elapsed = _post(server, "/v1/multimodal/classify", files=[("texts", (None, "hello"))] * 1000)
    assert response.status_code == 422 and elapsed < FAST_S
    assert response.json()["detail"] == ("too many parts in the form (Too many fields. Maximum number of fields is 24): "
                                         "send at most 8 items per request (MAX_ITEMS_PER_REQUEST)")


def test_too_many_files_are_refused(server: Server) -> None:
    response, elapsed = _post(server, "/v1/image/classify", files=[("files", ("a.jpg", b"x", "image/jpeg"))] * 40)
    assert response.status_code == 422 and elapsed < FAST_S
    assert response.json()["detail"].startswith("too many parts in the form (Too many files. Maximum number of files")


def test_a_text_field_larger_than_a_json_body_is_refused(server: Server) -> None:
    response, elapsed = _post(server, "/v1/multimodal/classify",
                              files=[("texts", (None, "a" * (MAX_JSON_BYTES + 10)))])
    assert response.status_code == 413 and elapsed < FAST_S
    assert response.json()["detail"] == (f"a form field is larger than the limit of {MAX_JSON_BYTES:,} bytes "
                                         "(MAX_JSON_BYTES); send images as files")


# ---- connections ---------------------------------------------------------------------------------------------


def test_slowloris_is_cut_off_while_healthz_keeps_answering(server: Server) -> None:
    closed_after: list[float] = []

    def slowloris() -> None:
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            try:
                for byte in head:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.05)
                sock.settimeout(10)
                sock.recv(1024)  # 408 or the close
            except OSError:
                pass
        closed_after.append(time.perf_counter() - started)

    attackers = [threading.Thread(target=slowloris) for _ in range(20)]
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]  # connect, send nothing
    for attacker in attackers:
        attacker.start()
    worst = 0.0
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while any(attacker.is_alive() for attacker in attackers):
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.05)
    for attacker in attackers:
        attacker.join()
    assert worst < 0.1, f"/healthz took {worst * 1000:.0f} ms during the attack"
    assert len(closed_after) == 20 and max(closed_after) < 1 + FAST_S  # HEADER_TIMEOUT=1
    for sock in idle:
        sock.settimeout(1)
        assert sock.recv(1024) == b"", "an idle connection is closed too, without an answer it could misread"
        sock.close()


def test_a_head_that_started_and_stalled_gets_408(server: Server) -> None:
    raw, elapsed = _raw(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    assert _status(raw) == 408 and elapsed < 1 + FAST_S
    assert raw.endswith(b"the request headers did not arrive within 1 s\n")


def _read_responses(sock: socket.socket, count: int) -> list[int]:
    """The statuses of ``count`` responses read from ``sock`` (each with a Content-Length)."""
    statuses, buffer = [], b""
    while len(statuses) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {statuses}: {buffer[:200]!r}"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(buffer) < length:
            buffer += sock.recv(65536)
        buffer = buffer[length:]
        statuses.append(int(head.split(b" ", 2)[1]))
    return statuses


def test_a_pipelined_body_does_not_count_toward_the_next_head(server: Server) -> None:
    body = json.dumps({"texts": ["the goalie made saves"]}).encode() + b" " * 20_000  # bigger than MAX_HEADER_BYTES
    first = (f"POST /v1/text/classify HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(first + b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the second head, split
        time.sleep(0.3)
        sock.sendall(b"X-Trace: 1\r\n\r\n")
        assert _read_responses(sock, 2) == [200, 200]


def test_a_head_terminator_split_across_reads_is_found(server: Server) -> None:
    body = json.dumps({"texts": ["the goalie made saves"]}).encode() + b" " * 5000
    head = (f"POST /v1/text/classify HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode()
    head += b"X-Pad: " + b"a" * (8100 - len(head)) + b"\r\n\r"  # just under MAX_HEADER_BYTES=8192, cut before its last byte
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.3)
        sock.sendall(b"\n" + body)  # the head's last byte, then a body that takes the read past the limit
        assert _read_responses(sock, 1) == [200]


# ---- requests at once ------------------------------------------------------------------------------------------


def test_healthz_answers_while_the_request_limit_is_full(server: Server) -> None:
    head = (f"POST /v1/text/classify HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"texts": ').encode()
    holders = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in holders:  # each request waits for the rest of its body: MAX_CONNECTIONS in the app at once
            sock.sendall(head)
        time.sleep(0.3)
        with httpx.Client(base_url=server.url, timeout=5) as client:
            refused = client.get("/v1/models", headers=HEADERS)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["detail"] == (f"the service is answering {MAX_CONNECTIONS:,} requests already "
                                                "(MAX_CONNECTIONS); try again shortly")
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
    finally:
        for sock in holders:
            sock.close()
    time.sleep(1.5)  # BODY_TIMEOUT=1 ends the held requests


def test_oversized_headers_are_refused(server: Server) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n"
    raw, elapsed = _raw(server, head)
    assert _status(raw) in (431, 0) and elapsed < FAST_S, raw[:200]  # 431, or the connection closed
    if raw:
        assert b"request headers are larger than 8,192 bytes" in raw


# ---- no paths in public answers ----------------------------------------------------------------------------


def test_public_load_errors_name_no_paths() -> None:
    reason = public_reason("/srv/crossmodal/checkpoints/text-big: manifest lists '/etc/passwd' as its vocabulary\n"
                           "Traceback (most recent call last): ...")
    assert reason == "text-big: manifest lists 'passwd' as its vocabulary"
    assert len(public_reason("x" * 1000)) == 200


def test_required_api_keys_refuse_to_start_without_keys() -> None:
    with pytest.raises(ValueError, match="REQUIRE_API_KEYS is set but API_KEYS holds no key"):
        Settings(require_api_keys=True, api_keys="")
    assert Settings(require_api_keys=True, api_keys="k1").api_key_set == {"k1"}


@pytest.mark.parametrize("letter", ["a", "ж", "漢"])
def test_the_default_json_limit_holds_a_full_request_of_long_texts_in_any_script(letter: str) -> None:
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    longest = json.dumps({"text": "a" * defaults["max_text_chars"]})
    long_posts = {"texts": [letter * 20_000] * defaults["max_items_per_request"]}
    as_utf8 = json.dumps(long_posts, ensure_ascii=False).encode()
    as_escapes = json.dumps(long_posts).encode()  # "\\u0436" for each letter outside ASCII
    assert max(len(longest), len(as_utf8), len(as_escapes)) < defaults["max_json_bytes"] < defaults["max_upload_bytes"]


def test_public_messages_keep_the_services_own_urls() -> None:
    assert scrub_paths("unknown model 'x': GET /v1/models lists them") == "unknown model 'x': GET /v1/models lists them"
    assert scrub_paths("cannot read /srv/crossmodal/checkpoints/x/manifest.json") == "cannot read manifest.json"


def test_a_refusal_before_routing_is_counted_under_v1(server: Server) -> None:
    def refused_401() -> float:
        text = httpx.get(server.url + "/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "crossmodal_http_requests_total" and sample.labels.get("route") == "/v1/*"
                        and sample.labels.get("status") == "401" and sample.labels.get("method") == "GET"):
                    return float(sample.value)
        return 0.0

    before = refused_401()
    assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 401
    assert refused_401() == before + 1
