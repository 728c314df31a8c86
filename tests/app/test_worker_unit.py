"""The worker in-process: out-of-memory on a single item, cancelled items are skipped, and the fair queue."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from servicekit import StubRunner
from torch import nn

from app.errors import DeadlineExceeded, Unavailable
from app.registry import ServedModel
from app.worker import InferenceWorker
from models.checkpoint import Manifest


class _AlwaysOutOfMemory(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _served(model: nn.Module) -> ServedModel:
    manifest = Manifest(name="m", task="image", architecture="x", config={}, classes=["a", "b"], preprocessing={})
    return ServedModel("m", manifest, model, StubRunner(), Path("."), torch.device("cpu"))


def test_single_item_out_of_memory_answers_503() -> None:
    async def scenario() -> None:
        worker = InferenceWorker(torch.device("cpu"), 4, 0, 10)
        worker.start()
        try:
            with pytest.raises(Unavailable, match="ran out of memory"):
                await worker.submit(_served(_AlwaysOutOfMemory()), [torch.zeros(2)], asyncio.get_running_loop().time() + 5)
        finally:
            await worker.stop(1)

    asyncio.run(scenario())


def test_probabilities_are_the_calibrated_softmax_in_input_order() -> None:
    async def scenario() -> list[torch.Tensor]:
        worker = InferenceWorker(torch.device("cpu"), 4, 0, 10)
        worker.start()
        try:
            logits = [torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.5, 0.5])]
            return await worker.submit(_served(_Identity()), logits, asyncio.get_running_loop().time() + 5)
        finally:
            await worker.stop(1)

    rows = asyncio.run(scenario())
    expected = torch.softmax(torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]]), dim=-1)
    torch.testing.assert_close(torch.stack(rows), expected)


def test_worker_survives_an_item_cancelled_past_its_deadline_while_its_batch_formed() -> None:
    """Regression: such an item's future was already cancelled, and answering it 504 raised
    InvalidStateError in the worker task, which died: every later request timed out (found by
    pausing a loaded server with SIGSTOP, which moves every deadline into the past)."""

    async def scenario() -> list[torch.Tensor]:
        worker = InferenceWorker(torch.device("cpu"), 4, 300, 10)  # a forming batch waits up to 300 ms
        worker.start()
        served = _served(_Identity())
        loop = asyncio.get_running_loop()
        try:
            with worker.preparing():  # another request is on its way, so the batch keeps waiting
                with pytest.raises(DeadlineExceeded):
                    await worker.submit(served, [torch.zeros(2)], loop.time() + 0.05)
                await asyncio.sleep(0.4)  # the batch closes with only the cancelled item in it
            return await asyncio.wait_for(worker.submit(served, [torch.ones(2)], loop.time() + 5), timeout=3)
        finally:
            await worker.stop(1)

    rows = asyncio.run(scenario())
    torch.testing.assert_close(rows[0], torch.tensor([0.5, 0.5]))


class _CompilingRunner(StubRunner):
    """Offers a 'compiled' forward (doubling), which fails on batches larger than ``works_up_to``."""

    def __init__(self, works_up_to: int) -> None:
        self.compile_pending = True
        self.works_up_to = works_up_to

    def _build_compiled(self) -> Any:
        def doubled(x: torch.Tensor) -> torch.Tensor:
            if len(x) > self.works_up_to:
                raise RuntimeError("the compiled forward broke")
            return 2 * x
        return doubled

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compiled(batch["x"]) if self.compiled is not None else model(**batch)


def test_a_compiled_forward_is_used_only_once_it_has_run_its_warm_up() -> None:
    async def scenario() -> None:
        worker = InferenceWorker(torch.device("cpu"), 4, 0, 10)
        worker.start()
        try:
            for works_up_to, in_use in ((2, True), (1, False)):  # the warm-up runs batches of 1 and 2
                served = ServedModel("m", _served(_Identity()).manifest, _Identity(), _CompilingRunner(works_up_to),
                                     Path("."), torch.device("cpu"))
                if in_use:
                    assert await worker.compile(served, [1, 2])
                else:
                    with pytest.raises(RuntimeError, match="broke"):
                        await worker.compile(served, [1, 2])
                assert (served.runner.compiled is not None) == in_use
                assert served.describe()["runtime"] == ("torchscript" if in_use else "eager")
                assert not await worker.compile(served, [1, 2])  # tried once only
                logits = torch.tensor([[0.0, 1.0]])
                got = await worker.submit(served, [logits[0]], asyncio.get_running_loop().time() + 5)
                expected = torch.softmax((2 if in_use else 1) * logits, dim=-1)[0]
                torch.testing.assert_close(got[0], expected)
        finally:
            await worker.stop(1)

    asyncio.run(scenario())


# ---- the fair queue: a short request is not served after another's long texts ----------------------

class _TokenRunner(StubRunner):
    """Payloads are 1-D "token" tensors; the forward records each batch's lengths and returns zeros."""

    task = "text"
    costs_tokens = True

    def __init__(self, batches: list[list[int]], first_batch_s: float = 0.0) -> None:
        self.batches, self.first_batch_s = batches, first_batch_s

    def collate(self, payloads: Any) -> dict[str, torch.Tensor]:
        self.batches.append([len(payload) for payload in payloads])
        if len(self.batches) == 1:
            time.sleep(self.first_batch_s)  # in the inference thread: the batch is running meanwhile
        return {"x": torch.zeros(len(payloads), 2)}

    def item_cost(self, payload: Any) -> int:
        return len(payload)


def _text_served(batches: list[list[int]], first_batch_s: float = 0.0) -> ServedModel:
    manifest = Manifest(name="t", task="text", architecture="x", config={}, classes=["a", "b"], preprocessing={})
    return ServedModel("t", manifest, _Identity(), _TokenRunner(batches, first_batch_s), Path("."), torch.device("cpu"))


def _run_requests(requests: list[list[int]], max_batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Queue each request's texts (token counts) while the worker is held, then let it run; the batches it made."""
    batches: list[list[int]] = []

    async def scenario() -> None:
        worker = InferenceWorker(torch.device("cpu"), max_batch_size, 0, 1000, max_batch_tokens)
        served = _text_served(batches)
        deadline = asyncio.get_running_loop().time() + 10
        submitted = [asyncio.ensure_future(worker.submit(served, [torch.zeros(n) for n in lengths], deadline))
                     for lengths in requests]
        await asyncio.sleep(0)  # every request queued before the worker takes its first batch
        worker.start()
        try:
            await asyncio.gather(*submitted)
        finally:
            await worker.stop(1)

    asyncio.run(scenario())
    return batches


def test_a_short_request_queued_behind_a_long_one_is_in_its_first_batch() -> None:
    batches = _run_requests([[1000] * 16, [10]], max_batch_size=32, max_batch_tokens=4000)
    # both start at virtual time 0: the short text follows the long request's first text, and the
    # token budget closes the batch at 4 texts padded to 1,000 tokens
    assert batches[0] == [1000, 10, 1000, 1000]
    assert len(batches) == 5


def test_items_over_the_budget_keep_their_place_and_smaller_ones_fill_the_batch() -> None:
    batches = _run_requests([[600, 3000, 500]], max_batch_size=32, max_batch_tokens=2000)
    assert batches == [[600, 500], [3000]]


def test_batches_keep_to_the_token_budget_and_a_longer_text_runs_alone() -> None:
    batches = _run_requests([[300] * 10, [5000], [20] * 3], max_batch_size=32, max_batch_tokens=1000)
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(batch) <= 1000
    assert [5000] in batches
    assert sorted(length for batch in batches for length in batch) == sorted([300] * 10 + [5000] + [20] * 3)


def test_without_a_token_budget_batches_fill_to_max_batch_size() -> None:
    batches = _run_requests([[1000] * 5, [10]], max_batch_size=4, max_batch_tokens=None)
    assert batches == [[1000, 10, 1000, 1000], [1000, 1000]]


def test_requests_take_turns_item_by_item() -> None:
    # two requests of equal items: their start tags interleave, so each batch holds both
    batches = _run_requests([[7] * 4, [8] * 4], max_batch_size=4, max_batch_tokens=None)
    assert batches == [[7, 8, 7, 8], [7, 8, 7, 8]]


def test_a_short_request_arriving_while_long_texts_run_heads_the_next_batch() -> None:
    batches: list[list[int]] = []

    async def scenario() -> None:
        worker = InferenceWorker(torch.device("cpu"), 32, 0, 1000, 4000)
        served = _text_served(batches, first_batch_s=0.3)
        deadline = asyncio.get_running_loop().time() + 10
        worker.start()
        try:
            long = asyncio.ensure_future(worker.submit(served, [torch.zeros(1000)] * 16, deadline))
            while not batches:  # the first batch of long texts is running
                await asyncio.sleep(0.001)
            await worker.submit(served, [torch.zeros(10)], deadline)
            await long
        finally:
            await worker.stop(1)

    asyncio.run(scenario())
    assert batches[0] == [1000] * 4
    assert batches[1][0] == 10  # before the long request's other 12 texts
