"""The tokenizer pool: real child processes give the in-thread ids; a child that dies or is stuck is
replaced, only a request that stalls a child by itself fails, and no text is ever tokenised in the
service's process instead; a slot that cannot start a child, or shutdown, leaves the rest alone."""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import os
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from servicekit import save_fusion_model

from app.errors import InvalidInput, Unavailable
from app.tasks import MultimodalRunner, Pair
from app.tokenizing import (
    GENERAL_NICENESS,
    GROUP_TEXTS_READ,
    EncoderSource,
    TokenizerPool,
    _ChildFailed,
    _Job,
    _JobQueue,
    _Slot,
    _Stuck,
    default_processes,
    encode_ids,
    load_encoder,
)
from models.checkpoint import load_checkpoint

TEXTS = ["The shuttle launch was delayed", "", "   ", "Which graphics card runs X11? It's NASA's.", "goalie " * 200]


def _wait(condition: Any, what: str, timeout: float = 60) -> None:
    until = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < until, what
        time.sleep(0.05)


def _start(pool: TokenizerPool, sources: tuple[EncoderSource, ...] = ()) -> None:
    pool.start(sources)
    _wait(lambda: pool.ready and len(pool.pids) == pool.processes, "the tokenizer processes did not start in 60 s")


@pytest.fixture
def pool() -> Iterator[TokenizerPool]:
    started = TokenizerPool(1)
    _start(started)
    yield started
    started.shutdown()


def _same(left: list[torch.Tensor], right: list[torch.Tensor]) -> bool:
    return len(left) == len(right) and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(left, right))


def _source(model_dir: Path) -> tuple[EncoderSource, Any]:
    source = EncoderSource(str(model_dir / "tiny-text"), "text")
    return source, load_encoder(source)


def test_pool_tokenises_in_a_child_process_with_the_in_thread_ids(pool: TokenizerPool, model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    assert pool.pids and os.getpid() not in pool.pids
    assert not pool._slots[0].express  # one process takes every job
    encoded = pool.encode(source, encoder, TEXTS)
    assert _same(encoded, encode_ids(encoder, TEXTS))
    assert [len(ids) for ids in encoded][1:3] == [0, 0] and len(encoded[4]) == 64  # max_tokens of tiny-text


def test_a_killed_child_is_replaced_and_the_next_texts_are_answered(pool: TokenizerPool, model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    [child] = pool.pids
    os.kill(child, signal.SIGKILL)
    assert _same(pool.encode(source, encoder, TEXTS, timeout=60), encode_ids(encoder, TEXTS))
    assert pool.pids and pool.pids != [child]


def test_a_stuck_child_fails_only_its_batch_and_is_replaced(model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    stuck = TokenizerPool(1, result_timeout_s=0.3, grace_s=0.2)
    _start(stuck)
    [child] = stuck.pids
    os.kill(child, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(InvalidInput, match="the texts took too long to tokenise"):
            stuck.encode(source, encoder, TEXTS, timeout=30)
        assert time.monotonic() - started < 5
        assert _same(stuck.encode(source, encoder, TEXTS, timeout=60), encode_ids(encoder, TEXTS))  # a new child
        assert stuck.pids and child not in stuck.pids
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE  # killed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
        stuck.shutdown()


def test_pool_with_no_processes_tokenises_in_the_calling_thread(model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    off = TokenizerPool(0)
    off.start()
    assert not off.ready and off.pids == []
    assert _same(off.encode(source, encoder, TEXTS), encode_ids(encoder, TEXTS))


async def _in_thread(function: Any, *args: Any) -> Any:  # what the service's run_blocking does
    return await asyncio.to_thread(function, *args)


def test_requests_of_one_event_loop_turn_go_to_the_child_in_one_call(pool: TokenizerPool, model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    real_submit, calls = pool._submit, []

    def counting_submit(*args: Any) -> Any:
        calls.append(args)
        return real_submit(*args)

    pool._submit = counting_submit  # type: ignore[method-assign]

    async def three_requests() -> list[list[torch.Tensor]]:
        return list(await asyncio.gather(*(pool.encode_async(source, encoder, [text], _in_thread) for text in TEXTS[:3])))

    encoded = asyncio.run(three_requests())
    assert len(calls) == 1
    assert all(_same(ids, encode_ids(encoder, [text])) for ids, text in zip(encoded, TEXTS[:3], strict=True))


def test_a_child_that_answers_within_the_grace_period_is_kept(model_dir: Path) -> None:
    """A paused service finds every timeout expired on resuming: the grace period, counted from
    then, lets the (not stuck) child answer instead of being replaced."""
    source, encoder = _source(model_dir)
    slow = TokenizerPool(1, result_timeout_s=0.3, grace_s=5)
    _start(slow)
    try:
        [child] = slow.pids
        os.kill(child, signal.SIGSTOP)

        async def paused_for_a_second() -> list[torch.Tensor]:
            asyncio.get_running_loop().call_later(1.0, os.kill, child, signal.SIGCONT)
            return await slow.encode_async(source, encoder, TEXTS, _in_thread)

        assert _same(asyncio.run(paused_for_a_second()), encode_ids(encoder, TEXTS))
        assert slow.pids == [child]  # still tokenising in the same child
    finally:
        slow.shutdown()


def test_children_that_cannot_load_their_encoders_fail_requests_instead_of_tokenising_here(
        model_dir: Path, tmp_path: Path) -> None:
    source, encoder = _source(model_dir)
    broken = TokenizerPool(1)
    broken.restart_delay_s = 0.2
    broken.start([source, EncoderSource(str(tmp_path / "gone"), "text")])
    try:
        with pytest.raises(Unavailable, match="the tokenizer process failed to start"):
            broken.encode(source, encoder, TEXTS, timeout=60)
        assert not broken.ready
    finally:
        broken.shutdown()


def test_odd_texts_reach_the_child_intact(pool: TokenizerPool, model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    odd = ["nul\x00byte", "emoji 😀 and ünïcödé", '"quoted" \\ backslash', "\u2028line separator\u2029"]
    assert _same(pool.encode(source, encoder, odd), encode_ids(encoder, odd))


def test_texts_are_cut_to_what_the_model_reads_before_they_are_sent(pool: TokenizerPool, model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    limit = encoder.preprocessing.read_chars
    assert limit is not None
    long_post = ("The shuttle launch was delayed again. " * 3000)[: 5 * limit]
    sent: list[list[str]] = []
    real_submit = pool._submit
    pool._submit = lambda src, texts: sent.append(texts) or real_submit(src, texts)  # type: ignore[method-assign]
    assert _same(pool.encode(source, encoder, [long_post]), pool.encode(source, encoder, [long_post[:limit]]))
    assert all(len(text) <= limit for texts in sent for text in texts)


# ---- groups from the event loop: their size, and who pays when one takes too long ----------------

STALLS = "stalls"  # a text the fake children below never finish


def _fake_children(pool: TokenizerPool) -> list[list[str]]:
    """Replace the pool's children: each job is answered at once (one id per text: its length), and a
    job holding ``STALLS`` misses the deadline. Returns the jobs sent, in order."""
    real_submit, sent = pool._submit, []

    def submit(source: EncoderSource, texts: list[str]) -> concurrent.futures.Future[list[bytes]]:
        if pool.closed:
            return real_submit(source, texts)
        sent.append(texts)
        future: concurrent.futures.Future[list[bytes]] = concurrent.futures.Future()
        if STALLS in texts:
            future.set_exception(_Stuck("the texts took too long to tokenise (over 0.3 s, TOKENIZER_TIMEOUT)"))
        else:
            future.set_result([array.array("q", [len(text)]).tobytes() for text in texts])
        return future

    pool._submit = submit  # type: ignore[method-assign]
    return sent


async def _each(pool: TokenizerPool, source: EncoderSource, encoder: Any,
                requests: list[list[str]]) -> list[list[torch.Tensor] | BaseException]:
    """The requests' answers (or errors), all of them arriving in one turn of the event loop."""
    return list(await asyncio.gather(*(pool.encode_async(source, encoder, texts, _in_thread) for texts in requests),
                                     return_exceptions=True))


def _lengths(answer: list[torch.Tensor] | BaseException) -> list[int]:
    assert isinstance(answer, list), answer
    return [int(ids) for ids in answer]


def test_a_group_closes_at_the_item_limit_or_its_characters_and_the_next_forms(model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    limit = encoder.preprocessing.read_chars
    assert limit is not None
    pool = TokenizerPool(2, group_texts=4)
    sent = _fake_children(pool)
    answers = asyncio.run(_each(pool, source, encoder, [["a", "bb", "c"], ["dd", "e", "f"], ["g"]]))
    assert sent == [["a", "bb", "c"], ["dd", "e", "f", "g"]]  # 3 + 3 > 4: two jobs, for two children
    assert [_lengths(answer) for answer in answers] == [[1, 2, 1], [2, 1, 1], [1]]
    wide = TokenizerPool(2, group_texts=1000)
    sent = _fake_children(wide)
    asyncio.run(_each(wide, source, encoder, [["x" * limit]] * (GROUP_TEXTS_READ + 1)))
    assert [len(job) for job in sent] == [GROUP_TEXTS_READ, 1]


def test_a_stuck_group_tries_each_request_alone_and_only_the_one_that_stalls_gets_422(model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    pool = TokenizerPool(1)
    sent = _fake_children(pool)
    ok_first, stalls, ok_last = asyncio.run(_each(pool, source, encoder, [["a", "bb"], [STALLS], ["c"]]))
    assert sent == [["a", "bb", STALLS, "c"], ["c"], ["a", "bb"], [STALLS]]  # the retries: smallest first
    assert _lengths(ok_first) == [1, 2] and _lengths(ok_last) == [1]
    assert isinstance(stalls, InvalidInput) and "the texts took too long to tokenise" in str(stalls)
    sent[:] = []
    [alone] = asyncio.run(_each(pool, source, encoder, [[STALLS, "a"]]))  # alone in its group: 422, no retry
    assert isinstance(alone, InvalidInput) and sent == [[STALLS, "a"]]


def test_a_request_caught_in_a_stuck_group_gets_503_when_its_retry_cannot_run(model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    pool = TokenizerPool(1)
    sent = _fake_children(pool)
    real_settle = pool._settle_group

    def settle_while_shutting_down(group: Any, done: Any) -> None:
        pool.closed = True
        real_settle(group, done)

    pool._settle_group = settle_while_shutting_down  # type: ignore[method-assign]
    caught, stalls = asyncio.run(_each(pool, source, encoder, [["a"], [STALLS]]))
    assert isinstance(caught, Unavailable) and caught.headers["Retry-After"] and isinstance(stalls, Unavailable)
    assert caught.detail == "the server is shutting down"
    assert sent == [["a", STALLS]]


def test_requests_caught_in_a_stuck_group_are_answered_by_the_new_child(model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    stuck = TokenizerPool(1, result_timeout_s=0.3, grace_s=0.2)
    _start(stuck)
    [child] = stuck.pids
    os.kill(child, signal.SIGSTOP)
    try:
        answers = asyncio.run(_each(stuck, source, encoder, [[text] for text in TEXTS[:3]]))
        assert all(_same(ids, encode_ids(encoder, [text])) for ids, text in zip(answers, TEXTS[:3], strict=True))
        assert stuck.pids and child not in stuck.pids
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
        stuck.shutdown()


# ---- slots: a failing one leaves the others serving; shutdown starts nothing ---------------------

def test_a_slot_that_cannot_start_a_child_leaves_queued_texts_to_the_others(
        model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, encoder = _source(model_dir)
    real_spawn = _Slot._spawn

    def spawn(slot: _Slot) -> None:
        if slot.index == 1:
            raise _ChildFailed("no room for it")
        real_spawn(slot)

    monkeypatch.setattr(_Slot, "_spawn", spawn)
    pool = TokenizerPool(2)
    pool.restart_delay_s = 0.05
    pool.start()
    try:
        _wait(lambda: pool.ready, "the tokenizer process did not start in 60 s")
        for _ in range(20):  # meanwhile slot 1 fails to start a child every 50 ms
            assert _same(pool.encode(source, encoder, TEXTS, timeout=60), encode_ids(encoder, TEXTS))
        ready, failing = pool._slots
        assert ready.start_error == "" and failing.start_error == "the tokenizer process failed to start: no room for it"
    finally:
        pool.shutdown()


def test_shutdown_during_a_batch_starts_no_new_child(model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    pool = TokenizerPool(1, result_timeout_s=30)
    _start(pool)
    [child] = pool.pids
    [slot] = pool._slots
    os.kill(child, signal.SIGSTOP)  # the slot's thread waits for its answer when shutdown comes
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as caller:
            waiting = caller.submit(pool.encode, source, encoder, TEXTS)
            time.sleep(0.3)
            pool.shutdown()
            with pytest.raises(Unavailable, match="the server is shutting down"):
                waiting.result(10)
        slot.thread.join(10)
        assert not slot.thread.is_alive() and slot.process is None and pool.pids == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)


# ---- multimodal: a decoding thread never waits on a tokenizer process ----------------------------

def test_multimodal_preparation_gives_its_thread_back_while_the_tokenizer_is_stuck(
        tmp_path: Path, jpegs: list[bytes]) -> None:
    save_fusion_model(tmp_path, "sentence", "fusion_late", sentence=True)
    checkpoint = load_checkpoint(tmp_path / "sentence")
    pairs = [Pair(jpegs[0], "The shuttle launch"), Pair(None, "goalie saves"), Pair(jpegs[1], None)]
    names = ["pair 0", "pair 1", "pair 2"]
    expected = MultimodalRunner(checkpoint, torch.device("cpu"), 1_000_000).prepare(pairs, names)
    pool = TokenizerPool(1, result_timeout_s=30)
    _start(pool)
    runner = MultimodalRunner(checkpoint, torch.device("cpu"), 1_000_000, tokenizer=pool)
    busy: list[str] = []
    threads = concurrent.futures.ThreadPoolExecutor(4)  # not waited for at the end of asyncio.run

    async def tracked(function: Any, *args: Any) -> Any:
        def run() -> Any:
            busy.append(function.__name__)
            try:
                return function(*args)
            finally:
                busy.remove(function.__name__)
        return await asyncio.get_running_loop().run_in_executor(threads, run)

    async def prepare(timeout: float) -> list[Any] | list[str]:
        """The payloads, or the functions still running in threads once ``timeout`` cut preparing short."""
        try:
            async with asyncio.timeout(timeout):
                return await runner.prepare_async(pairs, names, tracked)
        except TimeoutError:
            return list(busy)

    child = 0
    try:
        got = asyncio.run(prepare(60))
        assert len(got) == 3 and all(
            all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                for a, b in zip(left, right, strict=True)) for left, right in zip(got, expected, strict=True))
        [child] = pool.pids
        os.kill(child, signal.SIGSTOP)
        assert asyncio.run(prepare(1.0)) == []  # the images were decoded; no thread waits for the stuck child
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)
        pool.shutdown()
        threads.shutdown(wait=False, cancel_futures=True)


# ---- the express lane: small jobs never wait behind large ones -----------------------------------

LONG_TEXTS = ["goalie saves " * 1000]  # over EXPRESS_CHARS: a large job


def _job(texts: list[str]) -> _Job:
    return _Job(EncoderSource("nowhere", "text"), texts, concurrent.futures.Future())


def test_express_slots_take_only_small_jobs_and_general_ones_a_small_job_first() -> None:
    jobs = _JobQueue()
    first_large, small, second_large = _job(LONG_TEXTS), _job(["short"]), _job(LONG_TEXTS)
    assert not first_large.small and small.small
    jobs.put(first_large)
    with pytest.raises(queue.Empty):
        jobs.get(express=True, timeout=0.05)
    jobs.put(small)
    jobs.put(second_large)
    assert jobs.get(express=True, timeout=0) is small
    jobs.put(small)
    assert [jobs.get(express=False, timeout=0) for _ in range(3)] == [small, first_large, second_large]


def test_default_processes_keep_an_express_child_beside_a_general_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for cpus, processes in [(1, 1), (2, 2), (3, 2), (4, 3), (16, 4)]:
        monkeypatch.setattr("app.tokenizing.available_cpus", lambda cpus=cpus: cpus)
        assert default_processes() == processes


def test_requests_of_one_turn_group_short_texts_apart_from_long_ones(model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    pool = TokenizerPool(2)
    sent = _fake_children(pool)
    asyncio.run(_each(pool, source, encoder, [["a"], LONG_TEXTS, ["bb"]]))
    assert sorted(sent, key=lambda job: sum(map(len, job))) == [["a", "bb"], LONG_TEXTS]


def test_general_children_run_at_a_lower_cpu_priority_than_the_express_one(model_dir: Path) -> None:
    pool = TokenizerPool(2, result_timeout_s=30)
    _start(pool)
    try:
        general, express = pool._slots
        service = os.getpriority(os.PRIO_PROCESS, 0)
        assert general.pid is not None and express.pid is not None
        assert os.getpriority(os.PRIO_PROCESS, general.pid) == min(19, service + GENERAL_NICENESS)
        assert os.getpriority(os.PRIO_PROCESS, express.pid) == service
        killed = general.pid
        os.kill(killed, signal.SIGKILL)  # a replacement child is started at the same priority
        _wait(lambda: general.pid not in (None, killed), "no new general child in 60 s")
        replacement = general.pid
        assert replacement is not None  # it lowers its priority before it reports ready
        _wait(lambda: os.getpriority(os.PRIO_PROCESS, replacement) == min(19, service + GENERAL_NICENESS),
              "the new general child kept the service's priority", timeout=30)
    finally:
        pool.shutdown()


def test_one_child_keeps_the_service_priority(pool: TokenizerPool) -> None:
    (only,) = pool._slots
    assert only.pid is not None
    assert os.getpriority(os.PRIO_PROCESS, only.pid) == os.getpriority(os.PRIO_PROCESS, 0)


def test_a_small_job_is_answered_while_a_large_one_holds_the_general_child(model_dir: Path) -> None:
    source, encoder = _source(model_dir)
    pool = TokenizerPool(2, result_timeout_s=30)
    _start(pool)
    general, express = pool._slots
    assert express.express and not general.express
    general_child = general.pid
    assert general_child is not None
    os.kill(general_child, signal.SIGSTOP)  # the general child takes the large job, and does not answer
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as caller:
            large = caller.submit(pool.encode, source, encoder, LONG_TEXTS)
            _wait(lambda: len(pool.jobs) == 0, "the general child did not take the large job", timeout=10)
            started = time.monotonic()
            assert _same(pool.encode(source, encoder, TEXTS, timeout=10), encode_ids(encoder, TEXTS))
            assert time.monotonic() - started < 5 and not large.done()
            second_large = pool._submit(source, LONG_TEXTS)
            time.sleep(0.5)
            assert len(pool.jobs) == 1 and not second_large.done()  # the express child leaves it waiting
            os.kill(general_child, signal.SIGCONT)
            assert _same(large.result(30), encode_ids(encoder, LONG_TEXTS))
            assert len(second_large.result(30)) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(general_child, signal.SIGCONT)
        pool.shutdown()


def test_large_jobs_fail_when_no_general_child_starts_and_small_ones_are_answered(
        model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, encoder = _source(model_dir)
    real_spawn = _Slot._spawn

    def spawn(slot: _Slot) -> None:
        if not slot.express:
            raise _ChildFailed("no room for it")
        real_spawn(slot)

    monkeypatch.setattr(_Slot, "_spawn", spawn)
    pool = TokenizerPool(2)
    pool.restart_delay_s = 0.05
    pool.start()
    try:
        _wait(lambda: pool.ready, "the express tokenizer process did not start in 60 s")
        with pytest.raises(Unavailable, match="the tokenizer process failed to start: no room for it"):
            pool.encode(source, encoder, LONG_TEXTS, timeout=10)
        assert _same(pool.encode(source, encoder, TEXTS, timeout=10), encode_ids(encoder, TEXTS))
    finally:
        pool.shutdown()


def test_shutdown_with_jobs_waiting_in_both_queues_fails_them_and_stops_every_slot(model_dir: Path) -> None:
    source, _ = _source(model_dir)
    pool = TokenizerPool(2, result_timeout_s=1.5, grace_s=0.1)
    _start(pool)
    children = pool.pids
    slots = list(pool._slots)
    for child in children:
        os.kill(child, signal.SIGSTOP)  # each slot waits on its child, so the next jobs stay queued
    try:
        taken = [pool._submit(source, LONG_TEXTS)]
        _wait(lambda: len(pool.jobs) == 0, "the general child did not take the large job", timeout=10)
        taken.append(pool._submit(source, ["short"]))
        _wait(lambda: len(pool.jobs) == 0, "the express child did not take the small job", timeout=10)
        waiting = [pool._submit(source, texts) for texts in (LONG_TEXTS, ["short"], LONG_TEXTS, ["short"])]
        assert len(pool.jobs) == 4
        started = time.monotonic()
        pool.shutdown()
        assert time.monotonic() - started < 8
        for future in taken + waiting:
            with pytest.raises(Unavailable, match="the server is shutting down"):
                future.result(5)
        assert all(not slot.thread.is_alive() and slot.process is None for slot in slots) and pool.pids == []
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)


def test_texts_go_to_a_child_in_order_in_messages_of_bounded_size() -> None:
    from app.tokenizing import MESSAGE_BYTES, _chunks

    texts = [b"s" * 10] * 30 + [b"L" * (3 * MESSAGE_BYTES)] + [b"m" * (MESSAGE_BYTES // 3)] * 4
    chunks = _chunks(texts)
    assert [text for chunk in chunks for text in chunk] == texts
    assert len(chunks[0]) == 30 and chunks[1] == [texts[30]]  # the short ones share, the long one alone
    assert all(sum(map(len, chunk)) <= MESSAGE_BYTES for chunk in chunks if len(chunk) > 1)
    assert _chunks([]) == [] and _chunks([b"", b"x"]) == [[b"", b"x"]]
