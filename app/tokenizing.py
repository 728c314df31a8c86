"""Tokenising texts in worker processes, so that it stops competing with HTTP and inference for the GIL.

Tokenisation (spaCy's tokenizer, cleanup, the vocabulary lookup) is Python that holds the GIL. In
the service's threads it runs one at a time with the event loop and the inference thread, so a
text-heavy load kept one core of two busy (see benchmarks/serving/results-text.md). A
``TokenizerPool`` runs it in ``TOKENIZER_PROCESSES`` child processes instead:

* children come from a fork server (a clean, single-threaded process started for the purpose), never
  forked from the threaded service itself;
* a child builds a model's encoder (its preprocessing and verified vocabulary, from the checkpoint
  directory) on first use and keeps it; it answers with the token ids of each text as int64 bytes;
* the pool starts in the background: readiness never waits for it. Until a child has answered once,
  with the pool off (``TOKENIZER_PROCESSES=0``) or after a child died or stopped answering, texts
  are encoded in the calling thread by the same encoder code — the ids are the same either way.
"""

from __future__ import annotations

import array
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from app.metrics import TEXTS_TOKENISED
from models.text_encoding import TextEncoder

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncoderSource:
    """Where a child finds a model's text encoder: the checkpoint and which loader reads it."""

    checkpoint_dir: str
    task: str  # "text" or "multimodal"


def load_encoder(source: EncoderSource) -> TextEncoder:
    from models.checkpoint import read_manifest
    from models.fusion import load_fusion_text_encoder
    from models.text_encoding import load_text_encoder

    manifest = read_manifest(Path(source.checkpoint_dir))
    loader = load_fusion_text_encoder if source.task == "multimodal" else load_text_encoder
    return loader(source.checkpoint_dir, manifest)


def encode_ids(encoder: TextEncoder, texts: Sequence[str]) -> list[torch.Tensor]:
    """Each text's token ids (1-D int64, real tokens only, at most the encoder's ``max_tokens``)."""
    return [torch.tensor(ids, dtype=torch.long) for ids in encoder.ids(encoder.tokenize(texts))]


# ---- in the child processes --------------------------------------------------------------------

_child_encoders: dict[EncoderSource, TextEncoder] = {}


def _child_start() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the parent decides
    torch.set_num_threads(1)


def _child_encode(source: EncoderSource, texts: Sequence[str]) -> list[bytes]:
    encoder = _child_encoders.get(source)
    if encoder is None:
        encoder = _child_encoders[source] = load_encoder(source)
    return [array.array("q", ids).tobytes() for ids in encoder.ids(encoder.tokenize(texts))]


def _child_ping() -> int:
    return os.getpid()


# ---- in the service ----------------------------------------------------------------------------

def default_processes() -> int:
    """One less than the CPUs (the service's own process needs one), at least 1, at most 4."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


class TokenizerPool:
    """Encodes texts in child processes once they are up; in the calling thread until then."""

    def __init__(self, processes: int, result_timeout_s: float = 15.0) -> None:
        self.processes = processes
        # Far above any legitimate wait (a full queue of 20,000-character texts takes a few seconds):
        # a child that does not answer by then is stuck, and the service must not be.
        self.result_timeout_s = result_timeout_s
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()  # start (in a background thread) against shutdown
        self._closed = False

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Start the children; no-op with 0 processes. Blocks until the fork server has imported
        torch and spaCy (seconds): call it from a background thread, not the event loop."""
        with self._lock:
            if self.processes < 1 or self._executor is not None or self._closed:
                return
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # children start with torch and spaCy imported
            self._executor = concurrent.futures.ProcessPoolExecutor(self.processes, mp_context=context,
                                                                    initializer=_child_start)
            # one ping per child: ProcessPoolExecutor starts a child per pending job, up to the limit
            pings = [self._executor.submit(_child_ping) for _ in range(self.processes)]
        pings[0].add_done_callback(self._on_first_ping)

    def _on_first_ping(self, future: concurrent.futures.Future[int]) -> None:
        if future.exception() is None:
            self._ready.set()
            logger.info("tokenising in %d worker processes", self.processes)
        else:
            logger.error("tokenizer processes failed to start (%r); tokenising in threads", future.exception())

    def encode(self, source: EncoderSource, encoder: TextEncoder, texts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids per text (1-D int64); ``encoder`` is the same encoder, for the in-thread path."""
        executor = self._executor
        if executor is not None and self.ready:
            try:
                encoded = executor.submit(_child_encode, source, list(texts)).result(timeout=self.result_timeout_s)
            except BrokenProcessPool:
                self._ready.clear()
                logger.error("a tokenizer process died; tokenising in threads from now on")
            except TimeoutError:
                logger.error("a tokenizer process did not answer within %.0f s; tokenising in threads from now on",
                             self.result_timeout_s)
                self._abandon(executor)
            except Exception:  # e.g. the checkpoint moved since start: the loaded encoder still works
                logger.exception("tokenizer process failed on %s; tokenising this request in a thread", source)
            else:
                TEXTS_TOKENISED.labels("process").inc(len(encoded))
                return [torch.frombuffer(bytearray(ids), dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)
                        for ids in encoded]
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
