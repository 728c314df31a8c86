"""The models the service answers with: every checkpoint under ``MODEL_DIR``, loaded onto one device.

``app.repository`` says what is on disk: a directory per model, holding one checkpoint or one per
version. Models are known by ``manifest.name`` (the same in every version of one directory); a
client's model name and version are only ever keys into this registry, never part of a path. The
default model of a task is the one named in the settings, else the first by name; a model's default
version is the repository's (the latest, or the one its ``DEFAULT`` file names).

A ``ModelRegistry`` never changes: a reload (``app.reloading``) builds a new one and swaps it in, so a
request that resolved a model keeps it to the end.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.errors import ModelNotFound
from app.repository import ModelDir, VersionDir, scan
from app.settings import Settings
from app.tasks import RUNNERS, TaskRunner
from app.tokenizing import IN_THREAD, TokenizerPool
from models.calibration import Calibration
from models.checkpoint import CheckpointError, Manifest, load_checkpoint

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)  # compared and hashed by identity: two loads of one checkpoint are two models
class ServedModel:
    name: str
    manifest: Manifest
    model: nn.Module
    runner: TaskRunner
    directory: Path
    device: torch.device
    version: str = ""  # its version directory's name, else the manifest's version
    fingerprint: str = ""  # of the checkpoint it was loaded from (``app.repository.fingerprint``)

    calibration: Calibration = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.version = self.version or self.manifest.version
        self.calibration = Calibration.from_manifest(self.manifest.calibration)  # a bad one refuses the load

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @functools.cached_property
    def _public_manifest_parts(self) -> dict[str, Any]:
        """Metrics and lineage without file paths, derived once: the manifest does not change."""
        return {"metrics": _without_paths(self.manifest.metrics), "lineage": _without_paths(self.manifest.parent)}

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.name, "version": self.version, "task": m.task, "architecture": m.architecture,
            "classes": list(m.classes), "preprocessing": m.preprocessing, "calibration": m.calibration,
            "metrics": self._public_manifest_parts["metrics"], "lineage": self._public_manifest_parts["lineage"],
            "data_fingerprint": m.data_fingerprint,
            "code_version": m.code_version, "created_at": m.created_at, "weights_sha256": m.weights_sha256,
            "device": str(self.device), "runtime": "torchscript" if self.runner.compiled is not None else "eager",
        }


def _without_paths(value: Any) -> Any:
    """A manifest's lineage or metrics as the public API shows them: every ``path`` (where a parent lay
    on the training machine) left out, since public responses name no file paths; names and weight
    hashes identify a parent."""
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items() if key != "path"}
    if isinstance(value, list):
        return [_without_paths(item) for item in value]
    return value


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model: the versions loaded from one directory under ``MODEL_DIR``, and its default version."""

    directory: str  # the directory's name
    versions: Mapping[str, ServedModel]  # version → model, oldest first
    default_version: str

    @property
    def served(self) -> ServedModel:
        return self.versions[self.default_version]

    @property
    def name(self) -> str:
        return self.served.name

    @property
    def task(self) -> str:
        return self.served.task

    @property
    def fingerprints(self) -> dict[str, str]:
        return {version: served.fingerprint for version, served in self.versions.items()}


class ModelRegistry:
    def __init__(self, entries: Iterable[ModelEntry], defaults: dict[str, str]) -> None:
        self._entries = {entry.name: entry for entry in entries}
        self._defaults = defaults

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[ModelEntry]:
        return [self._entries[name] for name in sorted(self._entries)]

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    @property
    def models(self) -> list[ServedModel]:
        """Every loaded model version, by name, oldest version first."""
        return [served for entry in self.entries for served in entry.versions.values()]

    @property
    def defaults(self) -> dict[str, str]:
        return dict(self._defaults)

    def by_directory(self, directory: str) -> ModelEntry | None:
        return next((entry for entry in self._entries.values() if entry.directory == directory), None)

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; loaded models: {known}") from None

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model ``name`` at ``version`` (default: its default version)."""
        entry = self.entry(name)
        if version is None:
            return entry.served
        if version not in entry.versions:
            loaded = ", ".join(repr(v) for v in entry.versions)
            which = "version is" if len(entry.versions) == 1 else "versions are"
            raise ModelNotFound(f"model {name!r} has no version {version!r}; the loaded {which} {loaded}")
        return entry.versions[version]

    def resolve(self, name: str | None, task: str, version: str | None = None) -> ServedModel:
        """The model ``name`` (or the task's default) at ``version``, which must serve ``task``."""
        if name is None:
            if task not in self._defaults:
                raise ModelNotFound(f"no {task} model is loaded")
            name = self._defaults[task]
        served = self.get(name, version)
        if served.task != task:
            raise ModelNotFound(f"model {name!r} serves {served.task} requests, not {task} requests")
        return served

    def replaced(self, directory: str, entry: ModelEntry | None, settings: Settings) -> ModelRegistry:
        """A new registry with ``directory``'s model replaced by ``entry`` (None: removed);
        ``CheckpointError`` when that would break a rule (see ``build_registry``)."""
        entries = [old for old in self._entries.values() if old.directory != directory]
        return build_registry([*entries, *([entry] if entry is not None else [])], settings)


def build_registry(entries: list[ModelEntry], settings: Settings) -> ModelRegistry:
    """The registry of ``entries``: at least one, names unique, each task's default model loaded."""
    if not entries:
        raise CheckpointError(f"no servable checkpoints in MODEL_DIR {str(settings.model_dir)!r}")
    names: dict[str, str] = {}
    for entry in entries:
        if entry.name in names:
            raise CheckpointError(f"model name {entry.name!r} is used by two directories in MODEL_DIR: "
                                  f"{names[entry.name]!r} and {entry.directory!r}")
        names[entry.name] = entry.directory
    defaults: dict[str, str] = {}
    for task in sorted({entry.task for entry in entries}):
        wanted = settings.default_model(task)
        task_names = sorted(entry.name for entry in entries if entry.task == task)
        if wanted is not None and wanted not in task_names:
            raise CheckpointError(f"default {task} model {wanted!r} (DEFAULT_{task.upper()}_MODEL) is not among the "
                                  f"loaded {task} models {task_names}")
        defaults[task] = wanted or task_names[0]
    return ModelRegistry(entries, defaults)


def load_version(version: VersionDir, settings: Settings, device: torch.device,
                 tokenizer: TokenizerPool = IN_THREAD) -> ServedModel:
    """One checkpoint loaded with its task's runner (blocking: run it off the event loop)."""
    started = time.perf_counter()
    checkpoint = load_checkpoint(version.path, device)
    manifest = checkpoint.manifest
    if manifest.task not in RUNNERS:
        raise CheckpointError(f"{version.path}: the service does not serve {manifest.task} models")
    runner = RUNNERS[manifest.task](checkpoint, device, settings, tokenizer)
    served = ServedModel(manifest.name, manifest, checkpoint.model, runner, version.path, device, version.version,
                         version.fingerprint)
    logger.info("loaded %s version %s (%s, %s) from %s in %.2f s", served.name, served.version, manifest.task,
                manifest.architecture, version.path, time.perf_counter() - started)
    return served


def load_entry(found: ModelDir, settings: Settings, device: torch.device, tokenizer: TokenizerPool = IN_THREAD,
               reuse: Mapping[str, ServedModel] | None = None) -> ModelEntry:
    """Every version of a model directory; ``reuse``: versions already loaded, kept where their
    fingerprint is unchanged. ``CheckpointError`` when the versions disagree on the model's name or task."""
    versions: dict[str, ServedModel] = {}
    for version in found.versions:
        kept = (reuse or {}).get(version.version)
        if kept is not None and kept.fingerprint == version.fingerprint:
            versions[version.version] = kept
        else:
            versions[version.version] = load_version(version, settings, device, tokenizer)
    first = next(iter(versions.values()))
    for served in versions.values():
        if (served.name, served.task) != (first.name, first.task):
            raise CheckpointError(f"{found.name}: its versions must be one model of one task; version "
                                  f"{first.version} is {first.name!r} ({first.task}), version {served.version} is "
                                  f"{served.name!r} ({served.task})")
    return ModelEntry(found.name, versions, found.default)


def load_registry(settings: Settings, device: torch.device, tokenizer: TokenizerPool = IN_THREAD) -> ModelRegistry:
    """Load every checkpoint under ``settings.model_dir``; a broken one is a ``CheckpointError``.
    Text-reading models tokenise through ``tokenizer``."""
    return build_registry([load_entry(found, settings, device, tokenizer) for found in scan(settings.model_dir)],
                          settings)
