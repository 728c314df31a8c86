"""The batching worker under load, through the probe models (slow, failing, out-of-memory on demand).

A ``busy-probe`` request (3 s in the model) occupies the worker while the test fills the queue,
watching the server's own metrics, so the scenarios do not depend on timing luck.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import httpx
from PIL import Image
from servicekit import encode, metric, wait_for_metric


def _post(client: httpx.Client, image: bytes, model: str = "probe") -> httpx.Response:
    return client.post("/v1/image/classify", params={"model": model}, files=[("files", ("a.jpg", image, "image/jpeg"))])


def _occupy_worker(pool: ThreadPoolExecutor, client: httpx.Client, url: str, image: bytes) -> Future[httpx.Response]:
    """Start a 3 s batch and return once it runs (its queue wait is recorded when the batch starts)."""
    labels = {"model": "busy-probe"}
    started = metric(url, "crossmodal_queue_wait_seconds_count", labels)
    busy = pool.submit(_post, client, image, "busy-probe")
    wait_for_metric(url, "crossmodal_queue_wait_seconds_count", started + 1, labels)
    return busy


def test_concurrent_requests_are_batched(probe: httpx.Client, probe_server, jpegs: list[bytes]) -> None:
    url, labels = probe_server.url, {"model": "probe"}
    batches = metric(url, "crossmodal_batch_size_count", labels)
    items = metric(url, "crossmodal_batch_size_sum", labels)
    with ThreadPoolExecutor(8) as pool:
        busy = _occupy_worker(pool, probe, url, jpegs[0])
        waiting = [pool.submit(_post, probe, jpegs[i]) for i in range(5)]
        wait_for_metric(url, "crossmodal_queue_depth", 5)
        assert busy.result().status_code == 200
        assert [f.result().status_code for f in waiting] == [200] * 5
    assert metric(url, "crossmodal_batch_size_sum", labels) - items == 5
    assert metric(url, "crossmodal_batch_size_count", labels) - batches == 1  # all five in one batch
    assert metric(url, "crossmodal_batch_compute_seconds_count", labels) >= 1


def test_full_queue_answers_503_with_retry_after(probe: httpx.Client, probe_server, jpegs: list[bytes]) -> None:
    with ThreadPoolExecutor(8) as pool:
        busy = _occupy_worker(pool, probe, probe_server.url, jpegs[0])
        waiting = [pool.submit(_post, probe, jpegs[i]) for i in range(6)]
        wait_for_metric(probe_server.url, "crossmodal_queue_depth", 6)  # MAX_QUEUE=6
        refused = _post(probe, jpegs[7])
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["detail"] == "the server is busy: 6 items are queued (MAX_QUEUE=6)"
        assert busy.result().status_code == 200
        assert [f.result().status_code for f in waiting] == [200] * 6


def test_failing_batch_fails_only_its_requests(probe: httpx.Client, jpegs: list[bytes]) -> None:
    poison = encode(Image.new("RGB", (32, 32), (200, 10, 10)), "PNG")  # the probe model refuses constant images
    response = probe.post("/v1/image/classify", files=[("file", ("p.png", poison, "image/png"))])
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert _post(probe, jpegs[0]).status_code == 200


def test_out_of_memory_splits_the_batch(probe: httpx.Client, probe_server, jpegs: list[bytes]) -> None:
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(jpegs[:4])]
    response = probe.post("/v1/image/classify", params={"model": "oom-probe"}, files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 4
    assert "out of memory on a batch of 4 for oom-probe; splitting it" in probe_server.logs()


def test_request_past_its_deadline_answers_504(probe: httpx.Client, jpegs: list[bytes]) -> None:
    response = _post(probe, jpegs[0], "stuck-probe")  # 7 s in the model, REQUEST_TIMEOUT=6
    assert response.status_code == 504
    assert response.json()["detail"].startswith("no result within the request deadline")
