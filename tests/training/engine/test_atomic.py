"""Cache files written by several processes at once (torchrun's ranks) stay whole."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from training.engine.atomic import atomic_output


def test_concurrent_writers_leave_one_whole_file_and_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "images.npy"
    size = 1 << 20

    def write(value: int) -> None:
        for _ in range(10):
            with atomic_output(target) as handle:
                np.save(handle, np.full(size, value, dtype=np.uint8))
            loaded = np.load(target)  # whatever is there is always complete
            assert loaded.shape == (size,) and len(np.unique(loaded)) == 1

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(write, range(6)))
    assert [path.name for path in target.parent.iterdir()] == ["images.npy"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    target = tmp_path / "tokens.json.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as handle:
        handle.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and [path.name for path in tmp_path.iterdir()] == ["tokens.json.gz"]
