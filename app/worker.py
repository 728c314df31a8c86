"""One inference worker per device: a bounded queue, dynamic batching, inference off the event loop.

Requests put one item per input into the queue and await the items' futures. The worker takes
the first waiting item, then gathers more, up to ``max_batch_size``, for at most ``max_wait_ms``,
and only while more are on their way (requests still decoding); so a lone client pays no batching
delay and a busy server fills its batches.

The queue is fair between requests, not first come first served: each item carries a cost (its
tokens for a text, 1 for an image) and a start tag (start-time fair queueing: a request's first item
starts at the worker's current virtual time, each next one where the previous one's cost ends), and
batches take items in tag order. A request of one short text that arrives behind another's 64 long
ones is in the next batch, not the last. A batch of texts also stops at ``max_batch_tokens``
padded tokens (its items times its longest), so no batch of long texts holds the worker for long;
items that do not fit keep their place in line for the next batch.

Items are grouped per model and each group runs in the worker's single inference thread under
``torch.inference_mode`` (with the runner's autocast: see ``PRECISION``). A CUDA out-of-memory error
splits the group in halves and retries; any other exception fails only that group's items. Items
whose deadline passed before their batch started are answered 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from app import metrics
from app.errors import DeadlineExceeded, InferenceFailed, Unavailable
from app.registry import ServedModel
from models.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    error for error in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
    if error is not None
)


class OutOfMemory(Unavailable):
    def __init__(self) -> None:
        super().__init__("the device ran out of memory for this input; try fewer or smaller inputs", retry_after_s=5)


@dataclasses.dataclass(eq=False)
class Admission:
    """A request's items that count against ``MAX_QUEUE`` before they are queued."""

    items: int
    open: bool = True


@dataclasses.dataclass(eq=False)
class WorkItem:
    served: ServedModel
    payload: Any
    future: asyncio.Future[torch.Tensor]
    enqueued: float
    deadline: float
    cost: int = 1  # what it adds to its batch's work: tokens for a text, 1 for an image
    start_tag: float = 0.0  # fair-queueing order (see the module docstring)
    sequence: int = 0  # ties in arrival order

    def __lt__(self, other: WorkItem) -> bool:
        return (self.start_tag, self.sequence) < (other.start_tag, other.sequence)


class _FairQueue:
    """Items in start-tag order: the virtual time is the tag of the last item put in a batch, and a
    request's items are tagged from there, each one its predecessor's cost later."""

    def __init__(self) -> None:
        self._heap: list[WorkItem] = []
        self._sequence = itertools.count()
        self.virtual_time = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def extend(self, items: Sequence[WorkItem]) -> None:
        tag = self.virtual_time
        for item in items:
            item.start_tag, item.sequence = tag, next(self._sequence)
            tag += item.cost
            heapq.heappush(self._heap, item)

    def popleft(self) -> WorkItem:
        return heapq.heappop(self._heap)

    def served(self, item: WorkItem) -> None:
        """``item`` is in a batch: the virtual time moves to its tag (not to those of items passed over)."""
        self.virtual_time = max(self.virtual_time, item.start_tag)

    def put_back(self, items: Sequence[WorkItem]) -> None:
        """Return items taken but not run, with their tags: they keep their place in line."""
        for item in items:
            heapq.heappush(self._heap, item)


class InferenceWorker:
    def __init__(self, device: torch.device, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 max_batch_tokens: int | None = None) -> None:
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens  # padded tokens in one batch of texts (None: no bound)
        self._queue = _FairQueue()
        self._arrived = asyncio.Event()
        self._preparing = 0  # requests admitted and still preparing their inputs
        self._preparing_items = 0  # their items: admitted, not yet queued
        self._running = 0  # items in the batch being computed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{device}")
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ---- the request side ------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._running > 0 or self._preparing > 0

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Announce a request that will submit soon, so a forming batch waits for it."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1

    @property
    def waiting(self) -> int:
        """Items admitted and not yet taken into a batch: decoding, tokenising or queued."""
        return len(self._queue) + self._preparing_items

    def check_capacity(self, count: int) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down", retry_after_s=5)
        if self.waiting + count > self.max_queue:
            raise Unavailable(f"the server is busy: {self.waiting} items are queued (MAX_QUEUE={self.max_queue})")

    @contextlib.contextmanager
    def admit(self, count: int) -> Iterator[Admission]:
        """Admit a request of ``count`` items (503 when full): they count against ``MAX_QUEUE`` from
        now, while preparing, until their batch takes them (``submit(..., admission)``)."""
        self.check_capacity(count)
        admission = Admission(count)
        self._preparing += 1
        self._preparing_items += count
        try:
            yield admission
        finally:
            self._release(admission)

    def _release(self, admission: Admission) -> None:
        if admission.open:
            self._preparing -= 1
            self._preparing_items -= admission.items
            admission.open = False

    async def submit(self, served: ServedModel, payloads: Sequence[Any], deadline: float,
                     admission: Admission | None = None) -> list[torch.Tensor]:
        """Queue the payloads and wait for their calibrated probabilities, in order; ``admission``:
        the request was admitted already (``admit``), so it is not refused now."""
        if admission is None:
            self.check_capacity(len(payloads))
        else:
            self._release(admission)
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = [WorkItem(served, payload, loop.create_future(), now, deadline, served.runner.item_cost(payload))
                 for payload in payloads]
        self._queue.extend(items)
        metrics.QUEUE_DEPTH.set(len(self._queue))
        self._arrived.set()
        futures = [item.future for item in items]
        try:
            async with asyncio.timeout_at(deadline):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise DeadlineExceeded(
                f"no result within the request deadline ({len(self._queue)} items queued); try again later"
            ) from None
        finally:
            for future in futures:
                future.cancel()  # no-op when done; otherwise the worker skips the item

    # ---- the worker side -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"inference-worker-{self.device}")

    async def stop(self, timeout: float) -> None:
        """Refuse new work, let queued items finish for up to ``timeout`` s, then fail the rest."""
        self._closed = True
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while (self._queue or self._running) and loop.time() < until:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Unavailable("the server shut down before this item ran", retry_after_s=5))
        metrics.QUEUE_DEPTH.set(0)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _wait_for_item(self, until: float | None) -> bool:
        """Wait until the queue has an item (or ``until`` passes); True if it has one."""
        while not self._queue:
            self._arrived.clear()
            if until is None:
                await self._arrived.wait()
                continue
            remaining = until - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
        return True

    async def _collect(self) -> list[WorkItem]:
        await self._wait_for_item(None)
        loop = asyncio.get_running_loop()
        batch: list[WorkItem] = []
        passed_over: list[WorkItem] = []  # items that do not fit this batch: they head the next ones
        until = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if self._queue and len(passed_over) < self.max_batch_size:
                item = self._queue.popleft()
                if item.future.done():  # cancelled: its request timed out or went away
                    continue
                if batch and not self._fits(item, batch):
                    passed_over.append(item)
                    continue
                batch.append(item)
                self._queue.served(item)
                continue
            if not batch:
                await self._wait_for_item(None)
                continue
            if self._queue or self._preparing == 0 or not await self._wait_for_item(until):
                break
        self._queue.put_back(passed_over)
        metrics.QUEUE_DEPTH.set(len(self._queue))
        return batch

    def _fits(self, item: WorkItem, batch: list[WorkItem]) -> bool:
        """Whether ``item`` joins ``batch`` within the token budget: texts are padded to the batch's longest."""
        if self.max_batch_tokens is None or not item.served.runner.costs_tokens:
            return True
        return (len(batch) + 1) * max(item.cost, *(member.cost for member in batch)) <= self.max_batch_tokens

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._run_batch(batch)
            except Exception as error:  # a bug here must cost one batch, never the worker (every later request)
                logger.exception("the inference worker failed on a batch of %d; it goes on", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(InferenceFailed(f"inference failed: {error}"))

    async def _run_batch(self, batch: list[WorkItem]) -> None:
        now = asyncio.get_running_loop().time()
        live = []
        for item in batch:
            # Collected items can be cancelled while the batch waits for more (their request's
            # deadline passed, or its client went away): nothing is owed to them any more.
            if item.future.done():
                continue
            if now > item.deadline:
                item.future.set_exception(DeadlineExceeded("the request waited past its deadline in the queue"))
                metrics.ITEMS.labels(item.served.name, "deadline").inc()
            else:
                live.append(item)
        groups: dict[int, list[WorkItem]] = {}
        for item in live:  # by model object, not name: during a reload, two versions of a name may be queued
            groups.setdefault(id(item.served), []).append(item)
        for group in groups.values():
            await self._run_group(group)

    async def _run_group(self, group: list[WorkItem]) -> None:
        served = group[0].served
        started = asyncio.get_running_loop().time()
        for item in group:
            metrics.QUEUE_WAIT.labels(served.name).observe(started - item.enqueued)
        metrics.BATCH_SIZE.labels(served.name).observe(len(group))
        self._running = len(group)
        try:
            probabilities = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.compute, served, [item.payload for item in group]
            )
        except OutOfMemory as error:
            self._fail(group, error, "oom")
            return
        except Exception as error:
            logger.exception("batch of %d for %s failed", len(group), served.name)
            self._fail(group, InferenceFailed(f"inference failed for a batch of {served.name}: {error}"), "error")
            return
        finally:
            self._running = 0
        for item, row in zip(group, probabilities, strict=True):
            if not item.future.done():
                item.future.set_result(row)
        metrics.ITEMS.labels(served.name, "ok").inc(len(group))

    @staticmethod
    def _fail(group: list[WorkItem], error: BaseException, outcome: str) -> None:
        for item in group:
            if not item.future.done():
                item.future.set_exception(error)
        metrics.ITEMS.labels(group[0].served.name, outcome).inc(len(group))

    # ---- in the inference thread -----------------------------------------------------------

    def compute(self, served: ServedModel, payloads: Sequence[Any], record: bool = True) -> torch.Tensor:
        """Calibrated probabilities (B, classes) on the CPU; splits the batch on out-of-memory."""
        started = time.perf_counter()
        try:
            probabilities = self._forward(served, payloads)
        except _OOM_ERRORS:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(payloads) == 1:
                raise OutOfMemory() from None
            half = len(payloads) // 2
            logger.warning("out of memory on a batch of %d for %s; splitting it", len(payloads), served.name)
            return torch.cat([self.compute(served, payloads[:half], record),
                              self.compute(served, payloads[half:], record)])
        if record:
            metrics.COMPUTE.labels(served.name).observe(time.perf_counter() - started)
        return probabilities

    def _forward(self, served: ServedModel, payloads: Sequence[Any]) -> torch.Tensor:
        dtype = served.runner.autocast_dtype
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            batch = served.runner.collate(payloads)
            logits = served.runner.forward(served.model, batch)  # (B, classes)
            return served.runner.calibrate(logits, served.calibration).cpu()  # (B, classes)

    async def compile(self, served: ServedModel, batch_sizes: Sequence[int]) -> bool:
        """Build ``served``'s TorchScript forward, warm it up on ``batch_sizes`` and put it in use,
        all in one job of the inference thread: no batch sees it cold or half-built, and one that
        fails its warm-up is never used. True if it is in use (see ``TaskRunner.build_compiled``)."""
        built: bool = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._compile, served, batch_sizes)
        return built

    def _compile(self, served: ServedModel, batch_sizes: Sequence[int]) -> bool:
        runner = served.runner
        compiled = runner.build_compiled()
        if compiled is None:
            return False
        eager, runner.compiled = runner.compiled, compiled  # in this thread, batches run one at a time
        try:
            payload = runner.warmup_payload()
            for size in batch_sizes:
                self.compute(served, [payload] * size, record=False)
        except BaseException:
            runner.compiled = eager
            raise
        return True

    async def warm_up(self, served: ServedModel, batch_sizes: Sequence[int]) -> None:
        """Run example batches through ``served`` in the inference thread (first calls are slow)."""
        payload = served.runner.warmup_payload()
        loop = asyncio.get_running_loop()
        for size in batch_sizes:
            try:
                probabilities = await loop.run_in_executor(self._executor, self.compute, served, [payload] * size,
                                                           False)
            except OutOfMemory:
                logger.warning("warm-up of %s: a single item does not fit on %s", served.name, self.device)
                continue
            # a model whose outputs do not match its class names would answer with the wrong labels
            if probabilities.shape[-1] != len(served.classes):
                raise CheckpointError(f"model {served.name!r} outputs {probabilities.shape[-1]} scores but its "
                                      f"manifest lists {len(served.classes)} classes; it is not served")
