"""The tokenizer pool: real child processes give the in-thread ids, and the service survives losing one."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from app.tokenizing import EncoderSource, TokenizerPool, _child_ping, encode_ids, load_encoder

TEXTS = ["The shuttle launch was delayed", "", "   ", "Which graphics card runs X11? It's NASA's.", "goalie " * 200]


@pytest.fixture
def pool() -> Iterator[TokenizerPool]:
    started = TokenizerPool(1)
    started.start()
    until = time.monotonic() + 60
    while not started.ready:
        assert time.monotonic() < until, "the tokenizer process did not start within 60 s"
        time.sleep(0.05)
    yield started
    started.shutdown()


def _same(left: list[torch.Tensor], right: list[torch.Tensor]) -> bool:
    return len(left) == len(right) and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(left, right))


def test_pool_tokenises_in_a_child_process_with_the_in_thread_ids(pool: TokenizerPool, model_dir: Path) -> None:
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    encoder = load_encoder(source)
    assert pool._executor is not None and pool._executor.submit(_child_ping).result() != os.getpid()
    encoded = pool.encode(source, encoder, TEXTS)
    assert _same(encoded, encode_ids(encoder, TEXTS))
    assert [len(ids) for ids in encoded][1:3] == [0, 0] and len(encoded[4]) == 64  # max_tokens of tiny-text


def test_pool_falls_back_to_threads_when_its_child_dies(pool: TokenizerPool, model_dir: Path) -> None:
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    encoder = load_encoder(source)
    assert pool._executor is not None
    os.kill(pool._executor.submit(_child_ping).result(), signal.SIGKILL)
    time.sleep(0.5)
    assert _same(pool.encode(source, encoder, TEXTS), encode_ids(encoder, TEXTS))  # answered in this thread
    assert not pool.ready


def test_pool_falls_back_to_threads_when_its_child_stops_answering(model_dir: Path) -> None:
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    encoder = load_encoder(source)
    stuck = TokenizerPool(1, result_timeout_s=0.5)
    stuck.start()
    until = time.monotonic() + 60
    while not stuck.ready:
        assert time.monotonic() < until, "the tokenizer process did not start within 60 s"
        time.sleep(0.05)
    assert stuck._executor is not None
    child = stuck._executor.submit(_child_ping).result()
    os.kill(child, signal.SIGSTOP)
    try:
        assert _same(stuck.encode(source, encoder, TEXTS), encode_ids(encoder, TEXTS))  # after 0.5 s, in this thread
        assert not stuck.ready and stuck._executor is None
        time.sleep(0.5)
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE  # killed
        stuck.shutdown()  # returns: nothing left to wait for
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)


def test_pool_with_no_processes_tokenises_in_the_calling_thread(model_dir: Path) -> None:
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    encoder = load_encoder(source)
    off = TokenizerPool(0)
    off.start()
    assert not off.ready and off._executor is None
    assert _same(off.encode(source, encoder, TEXTS), encode_ids(encoder, TEXTS))
