"""Cache files that several processes may write at once, written so that none sees half a file.

The decoded-image, paired-data and token caches are shared by every process of a run: both ranks
of a ``torchrun`` job miss the cache together and both write it. With one fixed temporary name
they wrote into the same file and one rank's rename pulled it from under the other (seen as a
failed rank in CI). Here each writer has its own temporary file beside the target and renames it
into place atomically; the contents are the same, so the last rename wins harmlessly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only once it is completely written (removed on error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
