"""The service's life: load and warm up in the background, serve, drain on SIGTERM, stop.

``Service`` holds the settings, the model registry, the inference worker and the phase
(starting → ready → draining, or failed). The FastAPI lifespan starts loading in a background task
and returns at once, so ``/healthz`` answers and ``/readyz`` says 503 while models load. On SIGHUP,
once ready, ``MODEL_DIR`` is rescanned and new or changed models swapped in while serving
(``app.reloading``; readiness stays as it is). On SIGTERM the phase turns to draining (``/readyz``
503, new work 503), queued and running requests finish within ``DRAIN_TIMEOUT``, then uvicorn's own
shutdown runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import torch
from fastapi import FastAPI

from app.cpus import available_cpus
from app.encoder_copies import remove_encoder_copies
from app.errors import Unavailable
from app.metrics import FROZEN_OBJECTS, InFlight
from app.preprocess import configure_pillow
from app.registry import ModelRegistry, load_registry
from app.reloading import Reloader
from app.settings import Settings
from app.tokenizing import TokenizerPool, default_processes
from app.worker import InferenceWorker

logger = logging.getLogger(__name__)

STARTING, READY, DRAINING, FAILED = "starting", "ready", "draining", "failed"


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = settings.torch_device()
        self.phase = STARTING
        self.error = ""
        self.registry: ModelRegistry | None = None
        self.worker: InferenceWorker | None = None
        self.in_flight = InFlight()
        # Decoding runs in threads, at most this many requests at once (the container's CPUs, not the
        # node's); the rest wait in a bounded backlog, and past it are refused at once.
        self.max_preparing = settings.max_preparing or max(2, available_cpus())
        self.preprocess_pool = ThreadPoolExecutor(max_workers=self.max_preparing, thread_name_prefix="preprocess")
        self._preparing_slots: asyncio.Semaphore | None = None  # made on the event loop
        self._prepare_backlog = 0
        processes = settings.tokenizer_processes
        # A request caught in a stuck shared batch is retried alone: both tries (each the timeout plus
        # its grace) must end before REQUEST_TIMEOUT, so a hostile text costs its sender a 422, never a 504.
        tokenizer_timeout = min(settings.tokenizer_timeout, settings.request_timeout / 4)
        self.tokenizer = TokenizerPool(default_processes() if processes is None else processes,
                                       result_timeout_s=tokenizer_timeout, grace_s=min(5.0, tokenizer_timeout),
                                       group_texts=settings.max_items_per_request)
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None
        self._loading: asyncio.Task[None] | None = None
        self._compiling: asyncio.Task[None] | None = None
        self._refreezing: asyncio.Task[None] | None = None  # the heap frozen again after a reload
        self._draining: asyncio.Task[None] | None = None
        self._previous_sigterm: Any = None
        self._sighup_installed = False
        # a reload warms a model up even with WARMUP off: a batch of one checks its outputs against its classes
        self.reloader = Reloader(self, warmup_batch_sizes(self.device, settings.max_batch_size) if settings.warmup
                                 else [1])

    # ---- what routes use -----------------------------------------------------------------

    def ready(self) -> tuple[ModelRegistry, InferenceWorker]:
        """The registry and worker, or 503 while starting, draining or after a failed start."""
        if self.phase == READY and self.registry is not None and self.worker is not None:
            return self.registry, self.worker
        if self.phase == STARTING:
            raise Unavailable("the models are still loading; try again shortly", retry_after_s=2)
        if self.phase == DRAINING:
            raise Unavailable("the server is shutting down", retry_after_s=5)
        raise Unavailable(f"the models failed to load: {self.error}", retry_after_s=30)

    async def run_blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in a preparation thread, once one of ``max_preparing`` is free (503 when
        ``MAX_PREPARE_BACKLOG`` requests wait already). The slot is held until the function returns,
        even when its request gives up first: a thread cannot be stopped, so it still counts."""
        if self._preparing_slots is None:
            self._preparing_slots = asyncio.Semaphore(self.max_preparing)
        slots = self._preparing_slots
        if slots.locked():
            if self._prepare_backlog >= self.settings.max_prepare_backlog:
                raise Unavailable(f"the server is busy: {self._prepare_backlog} requests are waiting to be decoded "
                                  f"(MAX_PREPARE_BACKLOG={self.settings.max_prepare_backlog})")
            self._prepare_backlog += 1
            try:
                await slots.acquire()
            finally:
                self._prepare_backlog -= 1
        else:
            await slots.acquire()
        loop = asyncio.get_running_loop()
        try:
            running = self.preprocess_pool.submit(function, *args)
        except BaseException:
            slots.release()
            raise
        def release(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                loop.call_soon_threadsafe(slots.release)

        running.add_done_callback(release)
        return await asyncio.wrap_future(running)

    # ---- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        configure_pillow(self.settings.max_image_pixels)
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self._install_sigterm_handler()
        self._install_sighup_handler()
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="load-models")

    async def _load(self) -> None:
        settings = self.settings
        try:
            registry = await asyncio.to_thread(load_registry, settings, self.device, self.tokenizer)
            self._start_tokenizer(registry)
            worker = InferenceWorker(self.device, settings.max_batch_size, settings.max_wait_ms, settings.max_queue,
                                     settings.max_batch_tokens)
            if settings.warmup:
                for served in registry.models:
                    await worker.warm_up(served, warmup_batch_sizes(self.device, settings.max_batch_size))
            worker.start()
        except Exception as error:
            self.phase, self.error = FAILED, str(error) or type(error).__name__
            logger.exception("could not load the models from %s; shutting down", settings.model_dir)
            if self._previous_sigterm is not None:  # under a server: stop it (exits non-zero by SIGTERM)
                signal.raise_signal(signal.SIGTERM)
            return
        self.registry, self.worker = registry, worker
        await asyncio.to_thread(freeze_heap, True)  # before ready: the one full collection pauses no request
        if self.phase == STARTING:
            self.phase = READY
        self.ready_after_s = time.monotonic() - self.started_at
        logger.info("ready after %.2f s: %d models on %s (%s)", self.ready_after_s, len(registry), self.device,
                    ", ".join(f"{m.name} {m.version} [{m.task}]" for m in registry.models))
        if self.phase == READY:
            self._compiling = asyncio.get_running_loop().create_task(self._compile(registry, worker), name="compile")

    async def _compile(self, registry: ModelRegistry, worker: InferenceWorker) -> None:
        """Build the models' TorchScript forwards (``TRACE_MODELS``) once serving, so readiness does not
        wait for them; the eager models serve meanwhile, and each compiled forward takes over between
        two batches once checked and warm.
        A drain stops it: the requests being finished need the cores more."""
        started = time.monotonic()
        sizes = warmup_batch_sizes(self.device, self.settings.max_batch_size) if self.settings.warmup else []
        built = []
        for served in registry.models:
            if self.phase != READY:
                return
            try:
                if await worker.compile(served, sizes):
                    built.append(served.name)
            except Exception:  # the eager model goes on serving
                logger.exception("building the TorchScript forward of %s failed; it runs eagerly", served.name)
        if built:
            # only the young generations: what requests left in flight is young, the loaded heap frozen
            gc.collect(1)
            freeze_heap(collect=False)
            logger.info("TorchScript forwards of %s in use, %.2f s after ready", ", ".join(built),
                        time.monotonic() - started)

    def _start_tokenizer(self, registry: ModelRegistry) -> None:
        """Start the tokenizer processes with the text models' encoders, beside the warm-up: in a
        thread, since the fork server's imports take seconds (on the other core). Once started, a
        child started later (a replacement) loads the encoders of the registry serving then."""
        sources = [model.runner.source for model in registry.models if model.runner.source is not None]
        self.tokenizer.sources = tuple(sources)
        if sources:
            threading.Thread(target=self.tokenizer.start, args=(sources,), name="tokenizer-start", daemon=True).start()

    def install_registry(self, registry: ModelRegistry) -> None:
        """Serve ``registry`` from now on (a reload's swap: requests resolve their model once, so one
        that resolved a model of the old registry finishes on it)."""
        self.registry = registry
        # The replaced models must be collectable once the requests still on them finish: thaw now,
        # and freeze again (after one full collection) when those requests are past their deadline.
        gc.unfreeze()
        loop = asyncio.get_running_loop()

        def refreeze() -> None:  # the task is kept, or the loop could drop it half-way
            self._refreezing = loop.create_task(asyncio.to_thread(freeze_heap, True), name="refreeze-heap")

        loop.call_later(self.settings.request_timeout + 1, refreeze)
        self._start_tokenizer(registry)  # no-op but for its encoders when running already

    def _install_sighup_handler(self) -> None:
        """SIGHUP rescans ``MODEL_DIR`` (its default action would end the process). Through the event
        loop, so the reload starts from there; only in the main thread (not under a test client)."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (RuntimeError, ValueError, NotImplementedError):
            return
        self._sighup_installed = True

    def _on_sighup(self) -> None:
        if self.phase != READY:
            logger.warning("SIGHUP while %s: no reload", self.phase)
            return
        logger.info("SIGHUP: rescanning MODEL_DIR")
        self.reloader.request_rescan()

    # ---- drain and stop ------------------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (not under a test client)
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if self._draining is not None or self.phase == FAILED:
                self._hand_over(signum, frame)  # a second SIGTERM, or nothing to drain: stop now
                return
            self.phase = DRAINING
            logger.info("SIGTERM: draining (not ready; finishing %d in-flight requests)", self.in_flight.count)
            loop.call_soon_threadsafe(self._start_drain, signum)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _start_drain(self, signum: int) -> None:
        self._draining = asyncio.get_running_loop().create_task(self._drain(signum), name="drain")

    async def _drain(self, signum: int) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settings.drain_timeout
        while loop.time() < until and (self.in_flight.count > 0 or (self.worker is not None and self.worker.busy)):
            await asyncio.sleep(0.02)
        if self.in_flight.count:
            logger.warning("drain timeout: %d requests still in flight", self.in_flight.count)
        else:
            logger.info("drained; shutting down")
        self._hand_over(signum, None)

    def _hand_over(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
        else:  # no server handler (SIG_DFL): restore it and let the signal do its default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signum)

    async def stop(self) -> None:
        if self.phase != FAILED:
            self.phase = DRAINING
        if self._sighup_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.reloader.stop()
        for task in (self._loading, self._compiling):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.worker is not None:
            await self.worker.stop(self.settings.drain_timeout)
        self.preprocess_pool.shutdown(wait=False, cancel_futures=True)
        self.tokenizer.shutdown()
        remove_encoder_copies()  # the tokenizer processes that read them are gone
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)


def freeze_heap(collect: bool) -> None:
    """Move every object alive now (models, tokenizers, the app) out of the cyclic collector's reach.

    A full collection walks every tracked object: with the models and the web stack loaded that is
    over 200,000 objects and 60-100 ms with the GIL held, which stalled the event loop and the
    inference thread alike whenever one ran while serving. Frozen objects are still freed by
    reference counting; the collector then walks only what requests allocate. ``collect`` first clears
    the garbage (one pause of that length: before the service turns ready, and once after a reload).
    """
    if collect:
        gc.collect()
    gc.freeze()
    FROZEN_OBJECTS.set(gc.get_freeze_count())


def warmup_batch_sizes(device: torch.device, max_batch_size: int) -> list[int]:
    """The batch sizes to warm a model up with. On a GPU the largest batch too (kernel selection and
    the caching allocator); on the CPU only a single item and a pair: there the first batch of a new
    size costs about what later ones do, so warming the largest would only delay readiness."""
    if device.type == "cpu":
        return sorted({1, min(2, max_batch_size)})
    return sorted({1, max_batch_size})


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    await service.start()
    try:
        yield
    finally:
        await service.stop()
