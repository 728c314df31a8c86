"""What ``MODEL_DIR`` holds: model directories, their versions, and which version serves by default.

Two layouts, one per directory directly under ``MODEL_DIR``:

* ``MODEL_DIR/NAME/manifest.json`` (+ weights): one version, the manifest's ``version``;
* ``MODEL_DIR/NAME/VERSION/manifest.json`` (+ weights), several: the sub-directory's name is the
  version. The latest serves by default (names compared number by number: ``10`` after ``9``), or
  the one named in ``MODEL_DIR/NAME/DEFAULT``.

Directory and version names are ``NAME`` (letters, digits, ``.``, ``_``, ``-``; no leading dot) and
must resolve to a directory directly inside their parent: a symbolic link that leads out of
``MODEL_DIR`` is skipped. Nothing here loads weights; ``app.registry`` does, from what this finds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path

from models.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, CheckpointError, read_manifest

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEFAULT_FILE = "DEFAULT"
_MAX_DEFAULT_BYTES = 256


class InvalidName(ValueError):
    """A name that cannot be a model directory or version (the message never repeats it)."""


class NotAModelDirectory(LookupError):
    """No model directory of that name directly under ``MODEL_DIR``."""


@dataclasses.dataclass(frozen=True)
class VersionDir:
    version: str
    path: Path  # the checkpoint directory (holds the manifest)
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """One directory under ``MODEL_DIR``: its versions, oldest first, and the default one."""

    name: str
    versions: tuple[VersionDir, ...]
    default: str

    @property
    def fingerprints(self) -> dict[str, str]:
        return {version.version: version.fingerprint for version in self.versions}


def check_name(name: str, what: str = "model directory") -> str:
    if not NAME.fullmatch(name):
        raise InvalidName(f"not a {what} name: names are 1 to 128 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return name


def version_key(version: str) -> tuple[tuple[tuple[int, int, str], ...], str]:
    """Sort key comparing runs of digits as numbers: 1 < 2 < 10, v1.9 < v1.10."""
    parts = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", version) if part)
    return parts, version


def fingerprint(directory: Path) -> str:
    """What identifies a checkpoint's content, cheaply: its manifest's bytes (which hold the sha256 of
    every file) and its weights file's size and modification time, so weights replaced without their
    manifest count as a change too (and are then refused by their hash)."""
    digest = hashlib.sha256((directory / MANIFEST_FILE).read_bytes())
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        stat = weights.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _child(parent: Path, name: str) -> Path | None:
    """``parent / name`` if it is a directory that resolves directly inside ``parent`` (``parent`` resolved)."""
    path = parent / name
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if resolved.parent != parent:
        logger.warning("skipping %s: it leads outside %s", path, parent)
        return None
    return resolved if resolved.is_dir() else None


def model_directory(model_dir: Path, name: str) -> Path:
    """The directory ``name`` directly under ``model_dir``: ``InvalidName`` for a name that is not one
    (a path, ``..``, a URL), ``NotAModelDirectory`` when there is none or it leads elsewhere."""
    check_name(name)
    found = _child(model_dir.resolve(), name)
    if found is None:
        raise NotAModelDirectory(f"no model directory {name!r} in MODEL_DIR")
    return found


def read_model_dir(directory: Path) -> ModelDir | None:
    """The versions in ``directory`` (resolved, under ``MODEL_DIR``); None when it holds no checkpoint.
    ``CheckpointError`` for a manifest that cannot be read or a ``DEFAULT`` that names no version."""
    if (directory / MANIFEST_FILE).is_file():
        version = read_manifest(directory).version
        return ModelDir(directory.name, (VersionDir(version, directory, fingerprint(directory)),), version)
    versions = []
    for path in sorted(directory.iterdir(), key=lambda p: version_key(p.name)):
        if not NAME.fullmatch(path.name):
            continue  # dot-directories, temporary files of an atomic write
        resolved = _child(directory, path.name)
        if resolved is not None and (resolved / MANIFEST_FILE).is_file():
            versions.append(VersionDir(path.name, resolved, fingerprint(resolved)))
    if not versions:
        return None
    default = versions[-1].version
    pinned = directory / DEFAULT_FILE
    if pinned.is_file():
        with open(pinned, "rb") as handle:
            text = handle.read(_MAX_DEFAULT_BYTES).decode("utf-8", "replace").strip()
        if not NAME.fullmatch(text) or text not in {version.version for version in versions}:
            raise CheckpointError(f"{directory}/{DEFAULT_FILE} names no version of this model (it has "
                                  f"{', '.join(v.version for v in versions)})")
        default = text
    return ModelDir(directory.name, tuple(versions), default)


def directory_names(model_dir: Path) -> list[str]:
    """The names of the directories under ``model_dir`` that may be models, sorted (dot-directories,
    other names and links that lead out are skipped). ``CheckpointError`` when it is not a directory."""
    root = model_dir.resolve()
    if not root.is_dir():
        raise CheckpointError(f"MODEL_DIR {str(model_dir)!r} is not a directory")
    names = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        if not NAME.fullmatch(path.name):
            logger.warning("skipping %s: not a model directory name", path)
        elif _child(root, path.name) is not None:
            names.append(path.name)
    return names


def read_named(model_dir: Path, name: str) -> ModelDir | None:
    """``read_model_dir`` of the directory ``name``, logging one that holds no checkpoint."""
    read = read_model_dir(model_directory(model_dir, name))
    if read is None:
        logger.warning("skipping %s in MODEL_DIR: no %s, nor versions holding one", name, MANIFEST_FILE)
    return read


def scan(model_dir: Path) -> list[ModelDir]:
    """Every model directory under ``model_dir``, by name; ``CheckpointError`` for one that cannot be read."""
    return [read for name in directory_names(model_dir) if (read := read_named(model_dir, name)) is not None]


def checkpoint_directories(model_dir: Path) -> list[Path]:
    """Every checkpoint under ``model_dir``: each version of each model."""
    return [version.path for model in scan(model_dir) for version in model.versions]
