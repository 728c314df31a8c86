"""Reloading models while serving: new, changed and removed model directories, one reload at a time.

A rescan (SIGHUP, ``POST /admin/reload``) compares every directory under ``MODEL_DIR`` with what is
loaded (``app.repository`` fingerprints): a directory that is gone is unloaded, a new or changed one
loaded; ``load`` reloads one directory whatever its state, ``unload`` drops one. A directory's
versions are loaded in a thread beside the models serving (unchanged versions are kept), warmed up
on the inference worker (with their TorchScript forward, built off that worker), and only then is a
new registry swapped in, whole: a request that resolved the old model finishes on it, and the old
model is freed when the last such request is answered. A directory that fails, or whose swap would
break a rule of ``app.registry.build_registry`` (a name used twice, a task's ``DEFAULT_*_MODEL`` gone,
no model left), keeps what it had serving; the answer, the log and
``crossmodal_model_reloads_total{outcome="failed"}`` say why. Readiness never changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from app import metrics
from app.errors import scrub_paths
from app.registry import ModelEntry, ServedModel, load_entry
from app.repository import ModelDir, check_name, directory_names, model_directory, read_named
from models.checkpoint import CheckpointError

if TYPE_CHECKING:
    from app.lifecycle import Service
    from app.worker import InferenceWorker

logger = logging.getLogger(__name__)

LOADED, UNLOADED, UNCHANGED, FAILED = "loaded", "unloaded", "unchanged", "failed"
MAX_REASON_CHARS = 300


@dataclasses.dataclass
class Outcome:
    """What a reload did to one model directory (no filesystem paths: it is shown to clients)."""

    directory: str
    outcome: str  # loaded, unloaded, unchanged or failed
    model: str | None = None
    versions: list[str] = dataclasses.field(default_factory=list)
    default_version: str | None = None
    reason: str | None = None  # why it failed


class NotLoaded(LookupError):
    """No model was loaded from that directory."""


class Reloader:
    def __init__(self, service: Service, warmup_sizes: Sequence[int]) -> None:
        self.service = service
        self.model_dir = service.settings.model_dir.resolve()
        self.warmup_sizes = list(warmup_sizes)
        self._lock = asyncio.Lock()
        self._rescan_queued = False
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the operations ------------------------------------------------------------------

    async def rescan(self) -> list[Outcome]:
        """Unload the directories that are gone, load the new and changed ones; one ``Outcome`` each
        (unchanged ones too). ``CheckpointError``, and nothing changed, when ``MODEL_DIR`` cannot be
        read or holds no model directory at all."""
        async with self._lock:
            return await self._rescan()

    async def load(self, directory: str) -> Outcome:
        """Load (or load again, changed or not) the model directory ``directory``: ``InvalidName``,
        ``NotAModelDirectory`` before anything is read."""
        await asyncio.to_thread(model_directory, self.model_dir, directory)
        async with self._lock:
            self.service.ready()
            outcome = await self._load(directory, force=True)
        assert outcome is not None  # forced: a directory without a checkpoint is a failure
        return outcome

    async def unload(self, directory: str) -> Outcome:
        """Stop serving the model loaded from ``directory`` (``NotLoaded`` when none is); a failed
        outcome when the registry cannot do without it."""
        check_name(directory)
        async with self._lock:
            registry, _ = self.service.ready()
            if registry.by_directory(directory) is None:
                raise NotLoaded(f"no model is loaded from the directory {directory!r}")
            return self._unload(directory)

    def request_rescan(self) -> None:
        """A rescan from a signal: at most one waits behind the reload running (SIGHUPs coalesce)."""
        if self._rescan_queued:
            return
        self._rescan_queued = True
        task = asyncio.get_running_loop().create_task(self._signalled_rescan(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- inside the lock -----------------------------------------------------------------

    async def _signalled_rescan(self) -> None:
        async with self._lock:
            self._rescan_queued = False
            try:
                self.service.ready()
                outcomes = await self._rescan()
            except Exception as error:  # not ready, or MODEL_DIR unreadable: nothing changed
                logger.error("SIGHUP: no reload: %s", error)
                return
        changed = [o for o in outcomes if o.outcome != UNCHANGED]
        logger.info("SIGHUP: reloaded MODEL_DIR: %s", "; ".join(_summary(o) for o in changed) or "nothing changed")

    async def _rescan(self) -> list[Outcome]:
        registry, _ = self.service.ready()
        names = await asyncio.to_thread(directory_names, self.model_dir)
        if not names:  # an empty listing (a volume not mounted, say) must not unload every model
            raise CheckpointError("MODEL_DIR holds no model directory; nothing was changed")
        outcomes = [self._unload(entry.directory) for entry in registry.entries if entry.directory not in names]
        for name in names:
            outcome = await self._load(name, force=False)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    async def _load(self, directory: str, force: bool) -> Outcome | None:
        """Load ``directory`` if it is new or changed (or ``force``) and swap it in; None for a new
        directory that holds no checkpoint (on a rescan: not a model yet)."""
        settings, service = self.service.settings, self.service
        old = service.ready()[0].by_directory(directory)
        try:
            found = await asyncio.to_thread(read_named, self.model_dir, directory)
            if found is None:
                if old is None and not force:
                    return None
                raise CheckpointError(f"MODEL_DIR/{directory} holds no manifest.json, nor versions holding one")
            if not force and old is not None and _unchanged(old, found):
                return _outcome(directory, old, UNCHANGED)
            reuse = {} if force or old is None else old.versions
            entry = await asyncio.to_thread(load_entry, found, settings, service.device, service.tokenizer, reuse)
            _, worker = service.ready()
            for served in entry.versions.values():
                if served not in reuse.values():
                    await self._warm_up(served, worker)
            registry, _ = service.ready()  # not draining meanwhile
            service.install_registry(registry.replaced(directory, entry, settings))
        except Exception as error:
            return self._failed(directory, old, error)
        metrics.MODEL_RELOADS.labels(directory, LOADED).inc()
        return _outcome(directory, entry, LOADED)

    def _unload(self, directory: str) -> Outcome:
        registry, _ = self.service.ready()
        old = registry.by_directory(directory)
        try:
            without = registry.replaced(directory, None, self.service.settings)
        except CheckpointError as error:
            return self._failed(directory, old, error)
        self.service.install_registry(without)
        metrics.MODEL_RELOADS.labels(directory, UNLOADED).inc()
        logger.info("unloaded %s (directory %s)", old.name if old else "?", directory)
        return _outcome(directory, old, UNLOADED)

    async def _warm_up(self, served: ServedModel, worker: InferenceWorker) -> None:
        """Warm ``served`` up on the worker (which checks its outputs against its classes), with its
        TorchScript forward when it has one: built in a thread, since it is not serving yet."""
        compiled = await asyncio.to_thread(served.runner.build_compiled)  # None unless TRACE_MODELS on a CPU
        served.runner.compiled = compiled
        try:
            await worker.warm_up(served, self.warmup_sizes)
        except CheckpointError:
            raise
        except Exception:
            if compiled is None:
                raise
            logger.exception("the TorchScript forward of %s failed its warm-up; it runs eagerly", served.name)
            served.runner.compiled = None
            await worker.warm_up(served, self.warmup_sizes)

    def _failed(self, directory: str, old: ModelEntry | None, error: Exception) -> Outcome:
        reason = self.public_reason(error)
        kept = (f"version {old.default_version} of {old.name!r} keeps serving" if old is not None
                else "nothing was loaded")
        if isinstance(error, CheckpointError):
            logger.error("reload of %s failed (%s): %s", directory, kept, error)
        else:
            logger.error("reload of %s failed (%s)", directory, kept, exc_info=error)
        metrics.MODEL_RELOADS.labels(directory, FAILED).inc()
        outcome = _outcome(directory, old, FAILED)
        outcome.reason = f"{reason} ({kept})"
        return outcome

    def public_reason(self, error: Exception) -> str:
        """The error's first line, ``MODEL_DIR`` in place of its path and no other path in full."""
        text = str(error).strip() or type(error).__name__
        if not isinstance(error, CheckpointError):
            text = f"{type(error).__name__}: {text}"
        text = scrub_paths(text.splitlines()[0].replace(str(self.model_dir), "MODEL_DIR"))
        return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _unchanged(old: ModelEntry, found: ModelDir) -> bool:
    return old.fingerprints == found.fingerprints and old.default_version == found.default


def _outcome(directory: str, entry: ModelEntry | None, outcome: str) -> Outcome:
    if entry is None:
        return Outcome(directory, outcome)
    return Outcome(directory, outcome, entry.name, list(entry.versions), entry.default_version)


def _summary(outcome: Outcome) -> str:
    if outcome.outcome == FAILED:
        return f"{outcome.directory} failed: {outcome.reason}"
    return f"{outcome.directory} {outcome.outcome} ({outcome.model}, versions {', '.join(outcome.versions)})"
