"""Tokenising texts in worker processes, so that it stops competing with HTTP and inference for the GIL.

Tokenisation (spaCy's tokenizer, cleanup, the vocabulary lookup) is Python that holds the GIL. In
the service's threads it runs one at a time with the event loop and the inference thread, so a
text-heavy load kept one core of two busy (see benchmarks/serving/results-text.md). A
``TokenizerPool`` runs it in ``TOKENIZER_PROCESSES`` child processes instead:

* children come from a fork server (a clean, single-threaded process started for the purpose, with
  torch and spaCy imported), never forked from the threaded service itself;
* a child loads the encoders it is started with (each model's preprocessing and verified vocabulary,
  from the checkpoint directory) and tokenises once before it reports ready, so the first request
  it serves is as fast as the rest; an encoder it was not started with is loaded on first use. It
  answers with the token ids of each text as int64 bytes;
* the pool starts in the background, while the service warms up (its imports take seconds, on the
  other core): readiness never waits for it, nor for spaCy's import in the service process (about
  a second), which only a text that arrives before the pool is up causes. Until a child has
  answered once, with the pool off (``TOKENIZER_PROCESSES=0``) or after a child died or stopped
  answering, texts are encoded in the calling thread by the same encoder code — the ids are the
  same either way;
* on the event loop (``encode_async``), the texts of all requests that arrive in one turn of the
  loop go to a child in one call: a hand-off per request (a thread, then the pool's own threads,
  all under the service's GIL) cost the loaded service more than tokenising did.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from app.metrics import TEXTS_TOKENISED
from models.checkpoint import Manifest
from models.text_encoding import TextEncoder

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncoderSource:
    """Where a child finds a model's text encoder: the checkpoint and which loader reads it."""

    checkpoint_dir: str
    task: str  # "text" or "multimodal"


def load_encoder(source: EncoderSource, manifest: Manifest | None = None) -> TextEncoder:
    """The model's text encoder (``manifest``: the checkpoint's, when the caller has read it already)."""
    from models.checkpoint import read_manifest
    from models.fusion import load_fusion_text_encoder
    from models.text_encoding import load_text_encoder

    manifest = manifest or read_manifest(Path(source.checkpoint_dir))
    loader = load_fusion_text_encoder if source.task == "multimodal" else load_text_encoder
    return loader(source.checkpoint_dir, manifest)


def encode_ids(encoder: TextEncoder, texts: Sequence[str]) -> list[torch.Tensor]:
    """Each text's token ids (1-D int64, real tokens only, at most the encoder's ``max_tokens``)."""
    return [torch.tensor(ids, dtype=torch.long) for ids in encoder.ids(encoder.tokenize(texts))]


# ---- in the child processes --------------------------------------------------------------------

_child_encoders: dict[EncoderSource, TextEncoder] = {}


def _child_start(sources: Sequence[EncoderSource] = ()) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the parent decides
    torch.set_num_threads(1)
    for source in sources:  # before the first ping answers: a ready child has nothing left to load
        _child_encode(source, ["warm up"])


def _child_encode(source: EncoderSource, texts: Sequence[str]) -> list[bytes]:
    encoder = _child_encoders.get(source)
    if encoder is None:
        encoder = _child_encoders[source] = load_encoder(source)
    return [array.array("q", ids).tobytes() for ids in encoder.ids(encoder.tokenize(texts))]


def _child_ping() -> int:
    return os.getpid()


# ---- in the service ----------------------------------------------------------------------------

def _from_bytes(ids: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(ids), dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)


def _settle(target: asyncio.Future[list[bytes]], done: asyncio.Future[list[bytes]]) -> None:
    if target.done():
        return
    if done.cancelled():
        target.cancel()
    elif (error := done.exception()) is not None:
        target.set_exception(error)
        target.exception()  # retrieved: its requests may all have timed out and fallen back already
    else:
        target.set_result(done.result())


@dataclasses.dataclass
class _Group:
    """Texts of the requests that arrived in one turn of the event loop, sent to a child together."""

    texts: list[str]
    result: asyncio.Future[list[bytes]]


def default_processes() -> int:
    """One less than the CPUs (the service's own process needs one), at least 1, at most 4."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


class TokenizerPool:
    """Encodes texts in child processes once they are up; in the calling thread until then."""

    def __init__(self, processes: int, result_timeout_s: float = 15.0, grace_s: float = 5.0) -> None:
        self.processes = processes
        # Far above any legitimate wait (a full queue of 20,000-character texts takes a few seconds):
        # a child that does not answer by then is stuck, and the service must not be.
        self.result_timeout_s = result_timeout_s
        # ... counted again from when that timeout fired: a process that was paused (SIGSTOP, a
        # frozen VM) finds every timeout expired when it resumes, and its children are not stuck.
        self.grace_s = grace_s
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()  # start (in a background thread) against shutdown
        self._closed = False
        self._forming: dict[EncoderSource, _Group] = {}  # touched on the event loop only

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self, sources: Sequence[EncoderSource] = ()) -> None:
        """Start the children, each with the encoders of ``sources`` loaded; no-op with 0 processes.
        Blocks until the fork server has imported torch and spaCy (seconds): call it from a
        background thread, not the event loop."""
        with self._lock:
            if self.processes < 1 or self._executor is not None or self._closed:
                return
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__, "spacy"])  # imported once, shared by the children
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=context, initializer=_child_start, initargs=(tuple(sources),))
            # one ping per child: ProcessPoolExecutor starts a child per pending job, up to the limit
            pings = [self._executor.submit(_child_ping) for _ in range(self.processes)]
        pings[0].add_done_callback(self._on_first_ping)

    def _on_first_ping(self, future: concurrent.futures.Future[int]) -> None:
        if future.exception() is None:
            self._ready.set()
            logger.info("tokenising in %d worker processes", self.processes)
        else:
            logger.error("tokenizer processes failed to start (%r); tokenising in threads", future.exception())

    async def encode_async(self, source: EncoderSource, encoder: TextEncoder, texts: Sequence[str],
                           run_blocking: Callable[..., Awaitable[list[torch.Tensor]]]) -> list[torch.Tensor]:
        """``encode`` from the event loop: the texts join this turn's group for a child; in a
        thread (``run_blocking``) while the pool is not up or when the child fails."""
        executor = self._executor
        if executor is None or not self.ready:
            return await run_blocking(self.encode, source, encoder, texts)
        loop = asyncio.get_running_loop()
        group = self._forming.get(source)
        if group is None:
            group = self._forming[source] = _Group([], loop.create_future())
            loop.call_soon(self._send, source, executor)
        start = len(group.texts)
        group.texts.extend(texts)
        try:
            try:
                async with asyncio.timeout(self.result_timeout_s):
                    encoded = await asyncio.shield(group.result)
            except TimeoutError:
                async with asyncio.timeout(self.grace_s):
                    encoded = await asyncio.shield(group.result)
        except BrokenProcessPool:
            self._ready.clear()
            logger.error("a tokenizer process died; tokenising in threads from now on")
        except TimeoutError:
            logger.error("a tokenizer process did not answer within %.0f s; tokenising in threads from now on",
                         self.result_timeout_s + self.grace_s)
            self._abandon(executor)
        except Exception:
            logger.exception("tokenizer process failed on %s; tokenising this request in a thread", source)
        else:
            TEXTS_TOKENISED.labels("process").inc(len(texts))
            return [_from_bytes(ids) for ids in encoded[start:start + len(texts)]]
        return await run_blocking(self.encode, source, encoder, texts)

    def _send(self, source: EncoderSource, executor: concurrent.futures.ProcessPoolExecutor) -> None:
        group = self._forming.pop(source)
        try:
            sent = executor.submit(_child_encode, source, group.texts)
        except Exception as error:  # shut down or broken since the group formed: its requests fall back
            group.result.set_exception(error)
            return
        asyncio.wrap_future(sent).add_done_callback(lambda done: _settle(group.result, done))

    def encode(self, source: EncoderSource, encoder: TextEncoder, texts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids per text (1-D int64); ``encoder`` is the same encoder, for the in-thread path."""
        executor = self._executor
        if executor is not None and self.ready:
            try:
                sent = executor.submit(_child_encode, source, list(texts))
                try:
                    encoded = sent.result(timeout=self.result_timeout_s)
                except TimeoutError:
                    encoded = sent.result(timeout=self.grace_s)
            except BrokenProcessPool:
                self._ready.clear()
                logger.error("a tokenizer process died; tokenising in threads from now on")
            except TimeoutError:
                logger.error("a tokenizer process did not answer within %.0f s; tokenising in threads from now on",
                             self.result_timeout_s + self.grace_s)
                self._abandon(executor)
            except Exception:  # e.g. the checkpoint moved since start: the loaded encoder still works
                logger.exception("tokenizer process failed on %s; tokenising this request in a thread", source)
            else:
                TEXTS_TOKENISED.labels("process").inc(len(encoded))
                return [_from_bytes(ids) for ids in encoded]
        TEXTS_TOKENISED.labels("thread").inc(len(texts))
        return encode_ids(encoder, texts)

    def _abandon(self, executor: concurrent.futures.ProcessPoolExecutor) -> None:
        """Turn the pool off for good and kill its children: a stuck child would also block shutdown."""
        self._ready.clear()
        if self._executor is executor:
            self._executor = None
        processes = list(getattr(executor, "_processes", {}).values())  # CPython keeps them there (3.8–3.13)
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()

    def shutdown(self) -> None:
        """Stop the children (after the service drained, so they are idle: this takes milliseconds)."""
        with self._lock:
            self._closed = True
            self._ready.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None


IN_THREAD = TokenizerPool(0)  # the default for runners built outside a service (tests, benchmarks)
