"""The worker in-process: out-of-memory on a single item, and cancelled items are skipped."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from app.errors import DeadlineExceeded, Unavailable
from app.registry import ServedModel
from app.tasks import TaskRunner
from app.worker import InferenceWorker
from models.checkpoint import Manifest


class _Runner(TaskRunner):
    task = "image"

    def __init__(self) -> None:
        pass

    def prepare(self, inputs: Any, names: Any) -> list[Any]:
        return list(inputs)

    def collate(self, payloads: Any) -> dict[str, torch.Tensor]:
        return {"x": torch.stack(list(payloads))}

    def warmup_payload(self) -> Any:
        return torch.zeros(2)


class _AlwaysOutOfMemory(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _served(model: nn.Module) -> ServedModel:
    manifest = Manifest(name="m", task="image", architecture="x", config={}, classes=["a", "b"], preprocessing={})
    return ServedModel("m", manifest, model, _Runner(), Path("."), torch.device("cpu"))


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


class _CompilingRunner(_Runner):
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
