"""Tokenising texts in worker processes, so that it never competes with HTTP and inference for the GIL.

Tokenisation (spaCy's tokenizer, cleanup, the vocabulary lookup) is Python that holds the GIL. In
the service's threads it runs one at a time with the event loop and the inference thread, so a
text-heavy load kept one core of two busy (see benchmarks/serving/results-text.md), and one slow
text stalled everything. A ``TokenizerPool`` runs it in ``TOKENIZER_PROCESSES`` child processes:

* children come from a fork server (a clean, single-threaded process started for the purpose, with
  torch and spaCy imported), never forked from the threaded service itself;
* each child has a slot in the service: a thread that owns the child's pipe, sends it one batch at
  a time and waits for the answer for at most ``TOKENIZER_TIMEOUT`` (plus a grace period counted
  from when that fired, for a service that was paused). A child that misses it, or dies, is killed
  and replaced; only the requests of that batch are affected (see below for a batch that took too
  long; 503 for a child that died), and the next batch goes to the new child. Work never moves into
  the service process: with children configured, texts wait for one (within their request's deadline);
* a child loads the encoders it is started with (each model's preprocessing and verified vocabulary,
  from the checkpoint directory) and tokenises once before it reports ready, so the first request
  it serves is as fast as the rest; an encoder it was not started with is loaded on first use. It
  answers with the token ids of each text as int64 bytes;
* texts are cut to what the model reads (``TextPreprocessing.read_chars``) before they are sent;
* on the event loop (``encode_async``), the texts of the requests that arrive in one turn of the
  loop go to a child in one call: a hand-off per request cost the loaded service more than
  tokenising did. A group closes at ``MAX_ITEMS_PER_REQUEST`` texts or ``GROUP_TEXTS_READ`` texts'
  worth of characters and the next one forms, so that groups spread over the children. Short
  requests group apart from long ones, and with two children or more one of them is an express
  lane that takes only small jobs (``EXPRESS_CHARS``), so short texts never wait behind long ones;
  the others take a small job first, else the oldest large one. When a
  group takes too long, each of its requests tries again alone: only a request that stalls a child
  by itself gets 422, and the others their answer (or 503 if their retry cannot run).

With ``TOKENIZER_PROCESSES=0`` texts are tokenised in the calling thread by the same encoder code
(tests, benchmarks, a deliberate choice); the ids are the same either way.
"""

from __future__ import annotations

import array
import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from app.cpus import available_cpus
from app.errors import InvalidInput, Unavailable
from app.metrics import TEXTS_TOKENISED, TOKENIZER_RESTARTS
from models.checkpoint import Manifest
from models.text_encoding import TextEncoder

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncoderSource:
    """Where a child finds a model's text encoder: the checkpoint and which loader reads it."""

    checkpoint_dir: str
    task: str  # "text" or "multimodal"
    # where a child reads the encoder's files instead: a copy taken when the service loaded the checkpoint
    # (``app.encoder_copies``), so a checkpoint rewritten in place before its reload changes nothing here
    copy_dir: str = ""


def load_encoder(source: EncoderSource, manifest: Manifest | None = None) -> TextEncoder:
    """The model's text encoder (``manifest``: the checkpoint's, when the caller has read it already)."""
    from models.checkpoint import read_manifest
    from models.fusion import load_fusion_text_encoder
    from models.text_encoding import load_text_encoder

    directory = source.copy_dir or source.checkpoint_dir
    manifest = manifest or read_manifest(Path(directory))
    loader = load_fusion_text_encoder if source.task == "multimodal" else load_text_encoder
    return loader(directory, manifest)


def cut_texts(encoder: TextEncoder, texts: Sequence[str]) -> list[str]:
    """Each text cut to the prefix that decides its tokens: what lies beyond is never read."""
    limit = encoder.preprocessing.read_chars
    return [text[:limit] for text in texts] if limit is not None else list(texts)


def encode_ids(encoder: TextEncoder, texts: Sequence[str]) -> list[torch.Tensor]:
    """Each text's token ids (1-D int64, real tokens only, at most the encoder's ``max_tokens``)."""
    return [torch.tensor(ids, dtype=torch.long) for ids in encoder.ids(encoder.tokenize(cut_texts(encoder, texts)))]


# ---- in the child processes --------------------------------------------------------------------

_child_encoders: dict[EncoderSource, TextEncoder] = {}


def _child_start(sources: Sequence[EncoderSource] = ()) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the parent decides
    torch.set_num_threads(1)
    for source in sources:  # before the child reports ready: a ready child has nothing left to load
        _child_encode(source, ["warm up"])


def _child_encode(source: EncoderSource, texts: Sequence[str]) -> list[bytes]:
    encoder = _child_encoders.pop(source, None)  # put back last: the dict is in order of use
    if encoder is None:
        encoder = load_encoder(source)
        # a reloaded checkpoint's encoders (the same checkpoint_dir, another copy_dir): keep the one used
        # last before this (requests that resolved the model just before the swap), drop older ones
        same_directory = [seen for seen in _child_encoders if seen.checkpoint_dir == source.checkpoint_dir]
        for stale in same_directory[:-1]:
            del _child_encoders[stale]
    _child_encoders[source] = encoder
    return [array.array("q", ids).tobytes() for ids in encoder.ids(encoder.tokenize(texts))]


def _child_main(connection: Connection, sources: Sequence[EncoderSource], niceness: int = 0) -> None:
    """A child's life: lower its CPU priority by ``niceness``, load the encoders, say ready (with its
    pid), then answer batches until told to stop."""
    try:
        if niceness:
            os.nice(niceness)
        _child_start(sources)
    except Exception as error:
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", os.getpid()))
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        source, chunks = request
        try:
            texts = [text.decode("utf-8", "surrogatepass") for _ in range(chunks) for text in connection.recv()]
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, Any] = ("ok", _child_encode(source, texts))
        except Exception as error:  # e.g. the checkpoint moved: the batch fails, the child goes on
            reply = ("error", f"{type(error).__name__}: {error}")
        connection.send(reply)


# ---- in the service ----------------------------------------------------------------------------

# Texts go to a child in messages of about this many bytes: a whole batch pickled at once is one C call
# that holds the GIL however long the texts are; between messages the event loop gets it back. Short
# texts still share one message (measured: benchmarks/hardening/README.md).
MESSAGE_BYTES = 64 * 1024


def _chunks(encoded: list[bytes]) -> list[list[bytes]]:
    """``encoded`` in order, in runs of about ``MESSAGE_BYTES`` (a longer text alone)."""
    chunks: list[list[bytes]] = []
    size = 0
    for text in encoded:
        if not chunks or size + len(text) > MESSAGE_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(text)
        size += len(text)
    return chunks


def _from_bytes(ids: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(ids), dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)


@dataclasses.dataclass
class _Job:
    source: EncoderSource
    texts: list[str]
    future: concurrent.futures.Future[list[bytes]]

    @property
    def small(self) -> bool:
        return sum(map(len, self.texts)) <= EXPRESS_CHARS


class _JobQueue:
    """Jobs waiting for a child, small ones apart from large ones: an express slot takes only small
    jobs, a general slot a small one first, else the oldest large one. Closing wakes every slot."""

    def __init__(self) -> None:
        self._small: collections.deque[_Job] = collections.deque()
        self._large: collections.deque[_Job] = collections.deque()
        self._closed = False
        self._changed = threading.Condition()

    def __len__(self) -> int:
        with self._changed:
            return len(self._small) + len(self._large)

    def put(self, job: _Job) -> None:
        with self._changed:
            (self._small if job.small else self._large).append(job)
            self._changed.notify_all()  # slots of both kinds wait here: notify one could wake the wrong kind

    def get(self, express: bool, timeout: float) -> _Job | None:
        """The next job this slot may take; None once closed; ``queue.Empty`` after ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._closed or self._small or (not express and self._large),
                                          timeout):
                raise queue.Empty
            if self._closed:
                return None
            return self._small.popleft() if self._small else self._large.popleft()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def take_all(self, small: bool = True) -> list[_Job]:
        """Remove and return the waiting jobs (the large ones only, with ``small=False``)."""
        with self._changed:
            taken = list(self._large) + (list(self._small) if small else [])
            self._large.clear()
            if small:
                self._small.clear()
            return taken


class _Stuck(Exception):
    """A job's child missed the deadline (the message is the 422 for whoever caused it)."""


def _served(error: BaseException) -> BaseException:
    """The error a request sees for its job's ``error``."""
    return InvalidInput(str(error)) if isinstance(error, _Stuck) else error


@dataclasses.dataclass(eq=False)
class _Request:
    """One ``encode_async`` call: its texts, its answer, and whether its caller still waits for it."""

    texts: list[str]
    result: asyncio.Future[list[bytes]]
    group: _Group
    abandoned: bool = False  # its caller gave up (deadline, client gone)
    retry: concurrent.futures.Future[list[bytes]] | None = None

    @property
    def chars(self) -> int:
        return sum(map(len, self.texts))


@dataclasses.dataclass(eq=False)
class _Group:
    """Requests sent to a child in one job: those of one turn of the event loop, up to a size."""

    source: EncoderSource
    small: bool  # of requests that are small jobs by themselves, kept one (so that the express child takes it)
    char_limit: int | None
    requests: list[_Request] = dataclasses.field(default_factory=list)
    texts: int = 0
    chars: int = 0
    job: concurrent.futures.Future[list[bytes]] | None = None  # once sent

    def has_room(self, texts: Sequence[str], text_limit: int) -> bool:
        if not self.requests:
            return True
        chars = self.chars + sum(map(len, texts))
        return self.texts + len(texts) <= text_limit and (self.char_limit is None or chars <= self.char_limit)


# A group holds at most as many characters as this many texts that are read to the end: kept to a
# size a child answers well within the timeout, and more groups spread over more children.
GROUP_TEXTS_READ = 64
# A job of at most this many characters is small (the express child takes it): a fixed length, since a
# job's time follows its characters whatever the model reads; under one text read to the end at the
# default max_chars, so no long text holds the express child up, and hundreds of short requests' worth.
EXPRESS_CHARS = 10_000
# Where an express lane exists, the other children run at this lower CPU priority (os.nice): a client
# sending long texts is answered, but its tokenising takes only the CPU that short requests, the event
# loop and inference leave over (on 2 cores it otherwise took a core from everyone else: the normal
# client's p99 under the hardening benchmark's attack mix, benchmarks/hardening/README.md). The express
# child, which takes short requests, keeps the service's priority. An unprivileged process can lower its
# priority but never raise it back, so a child's niceness is fixed for its life.
GENERAL_NICENESS = 10


def default_processes() -> int:
    """One less than the CPUs this process may use (the service's own process needs one), 2 to 4:
    with two children one is the express lane, so short texts never wait behind long ones. 1 on one CPU."""
    cpus = available_cpus()
    return 1 if cpus < 2 else min(4, max(2, cpus - 1))


class _ChildFailed(Exception):
    pass


class _Slot:
    """One child process and the service thread that talks to it."""

    def __init__(self, pool: TokenizerPool, index: int, express: bool = False) -> None:
        self.pool, self.index, self.express = pool, index, express  # express: takes small jobs only
        self.process: Any = None
        self.connection: Connection | None = None
        self.start_error = ""  # why this slot's last child failed to start ("" once one is up)
        self.thread = threading.Thread(target=self._serve, name=f"tokenizer-{index}", daemon=True)

    @property
    def pid(self) -> int | None:
        """The live child's pid. Read from any thread, while the slot's own may be replacing it."""
        process = self.process
        try:
            return int(process.pid) if process is not None and process.is_alive() else None
        except ValueError:  # closed meanwhile
            return None

    def _spawn(self) -> None:
        """Start a child and wait for it to load its encoders; ``_ChildFailed`` if it cannot."""
        context = self.pool.context
        parent_end, child_end = context.Pipe()
        niceness = GENERAL_NICENESS if self.pool.has_express and not self.express else 0
        process = context.Process(target=_child_main, args=(child_end, self.pool.sources, niceness), daemon=True,
                                  name=f"tokenizer-{self.index}")
        process.start()
        child_end.close()
        self.process, self.connection = process, parent_end
        try:
            if self.pool.closed:  # shutdown may have passed this slot by already: stop the child here
                raise _ChildFailed("the pool is shutting down")
            if not parent_end.poll(self.pool.start_timeout_s):
                raise _ChildFailed(f"did not start within {self.pool.start_timeout_s:.0f} s")
            kind, value = parent_end.recv()
        except (EOFError, OSError, ValueError):  # died, or shutdown closed the pipe
            self.kill()
            raise _ChildFailed("died while starting") from None
        except _ChildFailed:
            self.kill()
            raise
        if kind != "ready":
            self.kill()
            raise _ChildFailed(str(value))

    def kill(self) -> None:
        process, connection, self.process, self.connection = self.process, self.connection, None, None
        if process is not None:
            try:
                process.kill()
                process.join(5)
                process.close()
            except ValueError:  # closed already (shutdown and the slot's thread both stop it)
                pass
        if connection is not None:
            connection.close()

    def _ensure_child(self) -> bool:
        """A live child in this slot (a dead one is replaced); False when none could be started, and
        always once the pool is shut down: no child is started after that."""
        if self.pool.closed:
            return False
        if self.pid is not None:
            return True
        if self.process is not None:
            logger.error("the tokenizer process of slot %d died while idle; starting a new one", self.index)
            self.kill()
        try:
            self._spawn()
        except _ChildFailed as error:
            self.start_error = f"the tokenizer process failed to start: {error}"
            if not self.pool.closed:
                logger.error("%s", self.start_error)
            return False
        self.start_error = ""
        self.pool.on_child_ready(self.index, int(self.process.pid))
        return True

    def _serve(self) -> None:
        pool = self.pool
        while not pool.closed:
            if not self._ensure_child():
                if pool.closed:
                    break
                if not pool.general_pids:  # no other slot can serve the queued large jobs either (nor
                    # the small ones, without an express child)
                    pool.fail_waiting(Unavailable(self.start_error, retry_after_s=5), small=not pool.pids)
                time.sleep(pool.restart_delay_s)
                continue
            try:
                job = pool.jobs.get(self.express, pool.idle_check_s)  # wakes now and then to replace a dead child
            except queue.Empty:
                continue
            if job is None:
                break
            if not job.future.set_running_or_notify_cancel():
                continue  # every request of the batch gave up already
            try:
                job.future.set_result(self._run(job))
            except BaseException as error:
                job.future.set_exception(error)
        process, connection = self.process, self.connection
        if connection is not None and process is not None:
            try:
                connection.send(None)
                process.join(2)
            except (OSError, ValueError):
                pass
        self.kill()

    def _run(self, job: _Job) -> list[bytes]:
        """The batch's answer from this slot's child. A child that dies is replaced and the batch
        tried once more (the child may have died before it arrived, killed from outside); one that
        is stuck is killed and replaced, and the batch fails with ``_Stuck``."""
        for attempt in (1, 2):
            if attempt == 2 and not self._ensure_child():
                if self.pool.closed:
                    raise Unavailable("the server is shutting down", retry_after_s=5)
                raise Unavailable(self.start_error, retry_after_s=5)
            assert self.connection is not None and self.process is not None
            pid, outcome, value = self.process.pid, *self._exchange(job)
            if outcome == "ok":
                return list(value)
            if outcome == "error":
                raise Unavailable(f"the tokenizer failed on these texts ({value})", retry_after_s=5)
            self.kill()
            if self.pool.closed:  # shutdown stopped the child under this batch
                raise Unavailable("the server is shutting down", retry_after_s=5)
            TOKENIZER_RESTARTS.inc()
            if outcome == "stuck":
                logger.error("tokenizer process %s took over %.0f s on a batch of %d texts; killed, starting a "
                             "new one", pid, self.pool.result_timeout_s + self.pool.grace_s, len(job.texts))
                raise _Stuck(f"the texts took too long to tokenise (over {self.pool.result_timeout_s:g} s, "
                             "TOKENIZER_TIMEOUT); send shorter or more ordinary texts")
            logger.error("tokenizer process %s died (batch of %d texts, try %d); starting a new one",
                         pid, len(job.texts), attempt)
        raise Unavailable("the tokenizer process died while tokenising these texts; try again", retry_after_s=1)

    def _exchange(self, job: _Job) -> tuple[str, Any]:
        """("ok", ids), ("error", reason), ("died", None) or ("stuck", None)."""
        connection = self.connection
        assert connection is not None
        try:
            chunks = _chunks([text.encode("utf-8", "surrogatepass") for text in job.texts])
            connection.send((job.source, len(chunks)))
            for chunk in chunks:
                connection.send(chunk)
            # the grace period counts from when the timeout fired: a service that was paused (SIGSTOP,
            # a frozen VM) finds every timeout expired when it resumes, and its child is not stuck
            if not (connection.poll(self.pool.result_timeout_s) or connection.poll(self.pool.grace_s)):
                return "stuck", None
            kind, value = connection.recv()
        except (OSError, EOFError, ValueError):
            return "died", None
        return ("ok", value) if kind == "ok" else ("error", value)


class TokenizerPool:
    """Encodes texts in child processes (in the calling thread with 0 processes)."""

    def __init__(self, processes: int, result_timeout_s: float = 10.0, grace_s: float = 5.0,
                 start_timeout_s: float = 120.0, group_texts: int = 64) -> None:
        self.processes = processes
        # Far above what any legitimate group takes: a child that does not answer by then is stuck
        # on hostile text, and is replaced.
        self.result_timeout_s = result_timeout_s
        self.grace_s = grace_s
        self.start_timeout_s = start_timeout_s
        self.group_texts = group_texts  # texts in one job from the event loop (MAX_ITEMS_PER_REQUEST)
        self.idle_check_s = 0.5
        self.restart_delay_s = 5.0
        self.jobs = _JobQueue()
        self.sources: tuple[EncoderSource, ...] = ()
        self.context: Any = None
        self.closed = False
        self._slots: list[_Slot] = []
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._forming: dict[tuple[EncoderSource, bool], _Group] = {}  # by (source, small); on the event loop only

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def pids(self) -> list[int]:
        """The live children's process ids."""
        return [pid for slot in self._slots if (pid := slot.pid) is not None]

    @property
    def has_express(self) -> bool:
        return any(slot.express for slot in self._slots)

    @property
    def general_pids(self) -> list[int]:
        """The live children's process ids, but the express lane's (they take large jobs too)."""
        return [pid for slot in self._slots if not slot.express and (pid := slot.pid) is not None]

    def start(self, sources: Sequence[EncoderSource] = ()) -> None:
        """Start the children, each with the encoders of ``sources`` loaded; no-op with 0 processes.
        Blocks until the fork server has imported torch and spaCy (seconds): call it from a
        background thread, not the event loop."""
        with self._lock:
            if self.processes < 1 or self._slots or self.closed:
                return
            self.sources = tuple(sources)
            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload([__name__, "spacy"])  # imported once, shared by the children
            # the last slot is the express lane, where there is another one to take large jobs
            self._slots = [_Slot(self, index, express=self.processes > 1 and index == self.processes - 1)
                           for index in range(self.processes)]
            for slot in self._slots:
                slot.thread.start()

    def on_child_ready(self, index: int, pid: int) -> None:
        if not self._ready.is_set():
            logger.info("tokenising in %d worker processes%s", self.processes,
                        " (one of them for small jobs only)" if self.processes > 1 else "")
        self._ready.set()

    def fail_waiting(self, error: Exception, small: bool = True) -> None:
        """Fail the queued batches (the large ones only, with ``small=False``): no child could be started for them."""
        for job in self.jobs.take_all(small):
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _submit(self, source: EncoderSource, texts: list[str]) -> concurrent.futures.Future[list[bytes]]:
        future: concurrent.futures.Future[list[bytes]] = concurrent.futures.Future()
        if self.closed:
            future.set_exception(Unavailable("the server is shutting down", retry_after_s=5))
        else:
            self.jobs.put(_Job(source, texts, future))
        return future

    async def encode_async(self, source: EncoderSource, encoder: TextEncoder, texts: Sequence[str],
                           run_blocking: Callable[..., Awaitable[list[torch.Tensor]]]) -> list[torch.Tensor]:
        """``encode`` from the event loop: the texts join this turn's group for a child; in a
        thread (``run_blocking``) only with 0 processes."""
        if self.processes < 1:
            return await run_blocking(self.encode, source, encoder, texts)
        request = self._join(source, encoder, cut_texts(encoder, texts))
        try:
            encoded = await asyncio.shield(request.result)
        except asyncio.CancelledError:
            self._abandon(request)
            raise
        TEXTS_TOKENISED.labels("process").inc(len(texts))
        return [_from_bytes(ids) for ids in encoded]

    def _join(self, source: EncoderSource, encoder: TextEncoder, texts: list[str]) -> _Request:
        """Add a request to its source's forming group; a full group is sent now, and a new one forms."""
        loop = asyncio.get_running_loop()
        small = sum(map(len, texts)) <= EXPRESS_CHARS
        group = self._forming.get((source, small))
        if group is not None and not group.has_room(texts, self.group_texts):
            self._send(group)
            group = None
        if group is None:
            read_chars = encoder.preprocessing.read_chars
            char_limit = EXPRESS_CHARS if small else GROUP_TEXTS_READ * read_chars if read_chars else None
            group = self._forming[(source, small)] = _Group(source, small, char_limit)
            loop.call_soon(self._send, group)
        request = _Request(texts, loop.create_future(), group)
        group.requests.append(request)
        group.texts += len(texts)
        group.chars += request.chars
        return request

    def _send(self, group: _Group) -> None:
        if self._forming.get((group.source, group.small)) is group:
            del self._forming[(group.source, group.small)]
        if group.job is not None:
            return  # sent already, when it filled up
        if all(request.abandoned for request in group.requests):
            return
        group.job = self._submit(group.source, [text for request in group.requests for text in request.texts])
        asyncio.wrap_future(group.job).add_done_callback(functools.partial(self._settle_group, group))

    def _abandon(self, request: _Request) -> None:
        """The request's caller gave up: a job only it (or only those who gave up) waits for is dropped."""
        request.abandoned = True
        if request.retry is not None:
            request.retry.cancel()
        elif request.group.job is not None and all(other.abandoned for other in request.group.requests):
            request.group.job.cancel()  # a job a child is tokenising already goes on, unread

    def _settle_group(self, group: _Group, done: asyncio.Future[list[bytes]]) -> None:
        if done.cancelled():
            for request in group.requests:
                request.result.cancel()
            return
        error = done.exception()
        if error is None:
            encoded, start = done.result(), 0
            for request in group.requests:
                _resolve(request.result, encoded[start:start + len(request.texts)])
                start += len(request.texts)
        elif isinstance(error, _Stuck) and len(group.requests) > 1:
            # maybe one request's texts stalled it: each tries again alone, the smallest first, so
            # that the requests not to blame are answered, and only one that stalls alone gets 422
            for request in sorted(group.requests, key=lambda each: each.chars):
                if request.abandoned:
                    request.result.cancel()
                    continue
                request.retry = self._submit(group.source, request.texts)
                asyncio.wrap_future(request.retry).add_done_callback(functools.partial(_settle, request.result))
        else:
            for request in group.requests:
                _fail(request.result, _served(error))

    def encode(self, source: EncoderSource, encoder: TextEncoder, texts: Sequence[str],
               timeout: float | None = None) -> list[torch.Tensor]:
        """Token ids per text (1-D int64); ``encoder`` is the same encoder, for the in-thread path."""
        if self.processes < 1:
            TEXTS_TOKENISED.labels("thread").inc(len(texts))
            return encode_ids(encoder, texts)
        sent = self._submit(source, cut_texts(encoder, texts))
        try:
            encoded = sent.result(timeout)
        except concurrent.futures.TimeoutError:
            sent.cancel()
            raise
        except _Stuck as error:
            raise _served(error) from None
        TEXTS_TOKENISED.labels("process").inc(len(texts))
        return [_from_bytes(ids) for ids in encoded]

    def shutdown(self) -> None:
        """Stop the children (after the service drained, so they are idle: this takes milliseconds).
        A slot thread still in an exchange sees its child stopped, and starts no other."""
        with self._lock:
            self.closed = True
            self._ready.clear()
            slots, self._slots = self._slots, []
        self.jobs.close()
        for slot in slots:
            slot.thread.join(5)
            slot.kill()
        self.fail_waiting(Unavailable("the server is shutting down", retry_after_s=5))


def _resolve(target: asyncio.Future[list[bytes]], value: list[bytes]) -> None:
    if not target.done():
        target.set_result(value)


def _fail(target: asyncio.Future[list[bytes]], error: BaseException) -> None:
    if not target.done():
        target.set_exception(error)
        target.exception()  # retrieved: its caller may have given up already


def _settle(target: asyncio.Future[list[bytes]], done: asyncio.Future[list[bytes]]) -> None:
    if done.cancelled():
        target.cancel()
    elif (error := done.exception()) is not None:
        _fail(target, _served(error))
    else:
        _resolve(target, done.result())


IN_THREAD = TokenizerPool(0)  # the default for runners built outside a service (tests, benchmarks)
