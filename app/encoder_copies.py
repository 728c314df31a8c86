"""Private copies of the files a text encoder is read from, so tokenizer processes never read ``MODEL_DIR``.

A tokenizer process loads a model's encoder from disk when it starts, or on first use, which may be
long after the service loaded the model. Read from the checkpoint in ``MODEL_DIR``, a checkpoint
rewritten there meanwhile (before the reload that serves it) would give it another vocabulary than
the model's. So each load of a text-reading model copies its manifest, as loaded, and the files the
manifest lists (checked against their sha256: the bytes the service loaded) into a directory of its
own, removed once nothing holds the model any more (its last request answered), and all when the
service stops.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

from models.checkpoint import MANIFEST_FILE, Manifest, read_extra_file

_root: Path | None = None
_root_lock = threading.Lock()


def _copies_root() -> Path:
    global _root
    with _root_lock:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="crossmodal-encoders-"))
        return _root


def remove_encoder_copies() -> None:
    """Remove every copy: the service stops (under uvicorn it then ends by its signal, so ``atexit``
    would not run), or the process exits."""
    global _root
    with _root_lock:
        root, _root = _root, None
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


atexit.register(remove_encoder_copies)


def copy_encoder_files(directory: Path, manifest: Manifest, owner: object) -> Path:
    """A private copy of ``directory``'s encoder files as ``manifest`` describes them, removed with ``owner``."""
    copy = Path(tempfile.mkdtemp(prefix=f"{directory.name}-", dir=_copies_root()))
    weakref.finalize(owner, shutil.rmtree, copy, True)
    for name in manifest.files:  # names confined to the checkpoint by read_extra_file
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_extra_file(directory, manifest, name))
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict()))
    return copy
