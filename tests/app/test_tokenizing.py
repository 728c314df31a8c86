"""The tokenizer pool: real child processes give the in-thread ids, and the service survives losing one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from app.tokenizing import EncoderSource, TokenizerPool, _child_ping, encode_ids, load_encoder

TEXTS = ["The shuttle launch was delayed", "", "   ", "Which graphics card runs X11? It's NASA's.", "goalie " * 200]


def _start(pool: TokenizerPool) -> None:
    pool.start()
    until = time.monotonic() + 60
    while not pool.ready:
        assert time.monotonic() < until, "the tokenizer process did not start within 60 s"
        time.sleep(0.05)


@pytest.fixture
def pool() -> Iterator[TokenizerPool]:
    started = TokenizerPool(1)
    _start(started)
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
    stuck = TokenizerPool(1, result_timeout_s=0.3, grace_s=0.2)
    _start(stuck)
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


async def _in_thread(function: Any, *args: Any) -> Any:  # what the service's run_blocking does
    return await asyncio.to_thread(function, *args)


def test_requests_of_one_event_loop_turn_go_to_the_child_in_one_call(pool: TokenizerPool, model_dir: Path) -> None:
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    encoder = load_encoder(source)
    assert pool._executor is not None
    real_submit, calls = pool._executor.submit, []

    def counting_submit(function: Any, *args: Any) -> Any:
        calls.append(function.__name__)
        return real_submit(function, *args)

    pool._executor.submit = counting_submit  # type: ignore[method-assign,assignment]

    async def three_requests() -> list[list[torch.Tensor]]:
        return list(await asyncio.gather(*(pool.encode_async(source, encoder, [text], _in_thread) for text in TEXTS[:3])))

    encoded = asyncio.run(three_requests())
    assert calls == ["_child_encode"]
    assert all(_same(ids, encode_ids(encoder, [text])) for ids, text in zip(encoded, TEXTS[:3], strict=True))


def test_a_child_that_answers_within_the_grace_period_keeps_the_pool(model_dir: Path) -> None:
    """A paused service finds every timeout expired on resuming: the grace period, counted from
    then, lets the (not stuck) child answer instead of turning the pool off for good."""
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    encoder = load_encoder(source)
    slow = TokenizerPool(1, result_timeout_s=0.3, grace_s=5)
    _start(slow)
    try:
        assert slow._executor is not None
        child = slow._executor.submit(_child_ping).result()
        os.kill(child, signal.SIGSTOP)

        async def paused_for_a_second() -> list[torch.Tensor]:
            asyncio.get_running_loop().call_later(1.0, os.kill, child, signal.SIGCONT)
            return await slow.encode_async(source, encoder, TEXTS, _in_thread)

        assert _same(asyncio.run(paused_for_a_second()), encode_ids(encoder, TEXTS))
        assert slow.ready and slow._executor is not None  # still tokenising in the child
    finally:
        slow.shutdown()


def test_async_encode_falls_back_to_a_thread_when_the_child_stops_answering(model_dir: Path) -> None:
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    encoder = load_encoder(source)
    stuck = TokenizerPool(1, result_timeout_s=0.3, grace_s=0.2)
    _start(stuck)
    assert stuck._executor is not None
    child = stuck._executor.submit(_child_ping).result()
    os.kill(child, signal.SIGSTOP)
    try:
        encoded = asyncio.run(stuck.encode_async(source, encoder, TEXTS, _in_thread))
        assert _same(encoded, encode_ids(encoder, TEXTS)) and not stuck.ready and stuck._executor is None
        stuck.shutdown()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)


def test_children_load_their_encoders_before_they_answer(model_dir: Path, tmp_path: Path) -> None:
    """A child loads the encoders it is started with before its first answer: one it cannot load
    breaks the pool at start (not at the first request), and texts are tokenised in threads."""
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    encoder = load_encoder(source)
    broken = TokenizerPool(1)
    broken.start([source, EncoderSource(str(tmp_path / "gone"), "text")])
    try:
        assert broken._executor is not None
        with pytest.raises(BrokenProcessPool):
            broken._executor.submit(_child_ping).result(timeout=60)
        assert not broken.ready
        assert _same(broken.encode(source, encoder, TEXTS), encode_ids(encoder, TEXTS))
    finally:
        broken.shutdown()


def test_odd_texts_reach_the_child_intact(pool: TokenizerPool, model_dir: Path) -> None:
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    encoder = load_encoder(source)
    odd = ["nul\x00byte", "emoji 😀 and ünïcödé", '"quoted" \\ backslash', "\u2028line separator\u2029"]
    assert _same(pool.encode(source, encoder, odd), encode_ids(encoder, odd))
