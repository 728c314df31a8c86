"""The checkpoint format: the one contract between training and serving.

A checkpoint is a directory holding ``model.safetensors`` (weights only, never pickle),
``manifest.json`` (plain JSON: format version, task, architecture and config, classes,
preprocessing, calibration, metrics, data fingerprint, lineage, code version, sha256 of every file)
and any extra files the manifest lists (a vocabulary, say). Writes are atomic: everything goes into
a temporary sibling directory which is renamed into place. Loads are strict: an unknown format
version, a hash mismatch, or a missing, extra or misshapen tensor is a ``CheckpointError``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.registry import build_model, config_to_dict

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
TASKS = ("image", "text", "multimodal")


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not match its manifest."""


@dataclasses.dataclass
class Manifest:
    name: str
    task: str
    architecture: str
    config: dict[str, Any]
    classes: list[str]
    preprocessing: dict[str, Any]
    calibration: dict[str, Any] = dataclasses.field(default_factory=lambda: {"temperature": 1.0})
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_fingerprint: str = ""
    parent: dict[str, Any] | None = None
    code_version: str = ""
    version: str = "1"
    training_command: str = ""
    created_at: str = ""
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Manifest:
        version = values.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"unsupported checkpoint format_version {version!r}; this code reads {FORMAT_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(f"manifest has unknown fields {unknown}")
        try:
            manifest = cls(**values)
        except TypeError as error:
            raise CheckpointError(f"manifest is incomplete: {error}") from None
        if manifest.task not in TASKS:
            raise CheckpointError(f"manifest task {manifest.task!r} is not one of {TASKS}")
        return manifest


@dataclasses.dataclass
class LoadedCheckpoint:
    model: nn.Module
    manifest: Manifest
    directory: Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    # mkdtemp makes a 0700 directory: open it up so a server running as another user can read it.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def publish_directory(staging: Path, target: Path) -> None:
    """Move a complete ``staging`` directory to ``target``, replacing any old one only at the end.

    Directories cannot be swapped in one rename, so the old one is first renamed aside; a crash in
    between leaves either the old or the new directory in place, never a half-written one.
    """
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    manifest: Manifest,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Atomically write ``model``'s weights, ``manifest`` and ``extra_files`` into ``directory``.

    Replaces an existing checkpoint there only once the new one is complete on disk.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name in (WEIGHTS_FILE, MANIFEST_FILE) or Path(name).name != name:
            raise ValueError(f"bad extra file name {name!r}")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        manifest = dataclasses.replace(
            manifest,
            format_version=FORMAT_VERSION,
            weights_sha256=sha256_file(staging / WEIGHTS_FILE),
            created_at=manifest.created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            files={},
        )
        for name, content in extra_files.items():
            (staging / name).write_bytes(content)
            manifest.files[name] = hashlib.sha256(content).hexdigest()
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
        _fsync_tree(staging)
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    path = checkpoint_file(directory, MANIFEST_FILE)
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST_FILE} (is this a checkpoint directory?)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: manifest must be a JSON object")
    return Manifest.from_dict(values)


def checkpoint_file(directory: str | os.PathLike[str], name: str) -> Path:
    """``directory / name`` for a file name from a manifest, which must stay inside the checkpoint:
    a plain name, no absolute path or ``..``, and no symbolic link that leads out of it."""
    directory = Path(directory)
    if not name or "\x00" in name or "\\" in name:
        raise CheckpointError(f"{directory}: manifest file name {name!r} is not a plain file name")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or name.startswith("/"):
        raise CheckpointError(f"{directory}: manifest file name {name!r} leads outside the checkpoint directory")
    path = directory / relative
    try:
        inside = path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError) as error:  # a symlink loop, say
        raise CheckpointError(f"{directory}: cannot resolve manifest file {name!r} ({error})") from None
    if not inside:
        raise CheckpointError(f"{directory}: manifest file {name!r} is a link that leads outside the checkpoint "
                              "directory")
    return path


def read_extra_file(directory: str | os.PathLike[str], manifest: Manifest, name: str) -> bytes:
    """An extra file listed in the manifest, checked against its recorded sha256."""
    if name not in manifest.files:
        raise CheckpointError(f"{directory}: manifest lists no file {name!r}")
    path = checkpoint_file(directory, name)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{directory}: cannot read {name!r} ({error.strerror or error})") from None
    if hashlib.sha256(content).hexdigest() != manifest.files[name]:
        raise CheckpointError(f"{directory}/{name}: sha256 does not match the manifest")
    return content


def load_state_dict(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Manifest]:
    """Verified weights and manifest, without building the model (for transfer)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = checkpoint_file(directory, WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")
    if sha256_file(weights) != manifest.weights_sha256:
        raise CheckpointError(f"{weights}: sha256 does not match the manifest (corrupt or edited?)")
    return load_file(str(weights)), manifest


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: weights do not match the architecture; missing {missing[:5]}, extra {extra[:5]}")
    for key, tensor in expected.items():
        if tensor.shape != state[key].shape:
            raise CheckpointError(
                f"{where}: tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}"
            )


def load_checkpoint(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model from its manifest, load the verified weights strictly, put it in eval mode."""
    directory = Path(directory)
    state, manifest = load_state_dict(directory)
    for name in manifest.files:  # every listed file: confined to the directory, and its hash checked
        read_extra_file(directory, manifest, name)
    try:
        model = build_model(manifest.architecture, manifest.config)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{directory}: cannot build {manifest.architecture!r}: {error}") from None
    check_state_dict(model, state, str(directory))
    model.load_state_dict(state, strict=True)
    return LoadedCheckpoint(model.to(device).eval(), manifest, directory)


def new_manifest(name: str, task: str, architecture: str, config: Any, **fields: Any) -> Manifest:
    """A manifest for a model built from ``architecture`` with ``config`` (dataclass or dict)."""
    config_dict = config if isinstance(config, dict) else config_to_dict(config)
    return Manifest(name=name, task=task, architecture=architecture, config=config_dict, **fields)
