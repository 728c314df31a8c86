"""The models the service answers with: every checkpoint under ``MODEL_DIR``, loaded onto one device.

Each sub-directory holding a ``manifest.json`` is a checkpoint (dot-directories are skipped, as are
directories without a manifest). Models are known by ``manifest.name``; a client's model name is
only ever a key into this registry, never part of a path. The default model of a task is the one
named in the settings, else the first by name.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.errors import ModelNotFound
from app.settings import Settings
from app.tasks import RUNNERS, TaskRunner
from app.tokenizing import IN_THREAD, TokenizerPool
from models.checkpoint import MANIFEST_FILE, CheckpointError, Manifest, load_checkpoint

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ServedModel:
    name: str
    manifest: Manifest
    model: nn.Module
    runner: TaskRunner
    directory: Path
    device: torch.device

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def temperature(self) -> float:
        return self.manifest.temperature

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.name, "version": m.version, "task": m.task, "architecture": m.architecture,
            "classes": list(m.classes), "preprocessing": m.preprocessing, "calibration": m.calibration,
            "metrics": m.metrics, "lineage": m.parent, "data_fingerprint": m.data_fingerprint,
            "code_version": m.code_version, "created_at": m.created_at, "weights_sha256": m.weights_sha256,
            "device": str(self.device), "runtime": "torchscript" if self.runner.compiled is not None else "eager",
        }


class ModelRegistry:
    def __init__(self, models: list[ServedModel], defaults: dict[str, str]) -> None:
        self._models = {model.name: model for model in models}
        self._defaults = defaults

    def __len__(self) -> int:
        return len(self._models)

    @property
    def models(self) -> list[ServedModel]:
        return [self._models[name] for name in sorted(self._models)]

    @property
    def defaults(self) -> dict[str, str]:
        return dict(self._defaults)

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; loaded models: {known}") from None

    def resolve(self, name: str | None, task: str) -> ServedModel:
        """The model ``name`` (or the task's default), which must serve ``task``."""
        if name is None:
            if task not in self._defaults:
                raise ModelNotFound(f"no {task} model is loaded")
            return self._models[self._defaults[task]]
        model = self.get(name)
        if model.task != task:
            raise ModelNotFound(f"model {name!r} serves {model.task} requests, not {task} requests")
        return model


def checkpoint_directories(model_dir: Path) -> list[Path]:
    if not model_dir.is_dir():
        raise CheckpointError(f"MODEL_DIR {str(model_dir)!r} is not a directory")
    found = []
    for path in sorted(model_dir.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        if not (path / MANIFEST_FILE).is_file():
            logger.warning("skipping %s: no %s", path, MANIFEST_FILE)
            continue
        found.append(path)
    return found


def load_registry(settings: Settings, device: torch.device, tokenizer: TokenizerPool = IN_THREAD) -> ModelRegistry:
    """Load every checkpoint under ``settings.model_dir``; a broken one is a ``CheckpointError``.
    Text-reading models tokenise through ``tokenizer``."""
    models: list[ServedModel] = []
    for directory in checkpoint_directories(settings.model_dir):
        started = time.perf_counter()
        checkpoint = load_checkpoint(directory, device)
        manifest = checkpoint.manifest
        if manifest.task not in RUNNERS:
            logger.warning("skipping %s: the service does not serve %s models yet", directory, manifest.task)
            continue
        if any(model.name == manifest.name for model in models):
            raise CheckpointError(f"{directory}: model name {manifest.name!r} is used by two checkpoints")
        runner = RUNNERS[manifest.task](checkpoint, device, settings, tokenizer)
        models.append(ServedModel(manifest.name, manifest, checkpoint.model, runner, directory, device))
        logger.info("loaded %s (%s, %s) from %s in %.2f s", manifest.name, manifest.task, manifest.architecture,
                    directory, time.perf_counter() - started)
    if not models:
        raise CheckpointError(f"no servable checkpoints in MODEL_DIR {str(settings.model_dir)!r}")
    defaults: dict[str, str] = {}
    for task in sorted({model.task for model in models}):
        wanted = settings.default_model(task)
        names = sorted(model.name for model in models if model.task == task)
        if wanted is not None and wanted not in names:
            raise CheckpointError(f"default {task} model {wanted!r} is not among the loaded {task} models {names}")
        defaults[task] = wanted or names[0]
    return ModelRegistry(models, defaults)
