"""How many CPUs this process may use: its affinity mask and its container's CPU quota, not the node's count."""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def _quota() -> float | None:
    """CPUs allowed by the cgroup's CPU quota (v2 ``cpu.max``, else v1 CFS), or None when unlimited."""
    try:
        quota, period = _CGROUP_V2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (int(path.read_text()) for path in _CGROUP_V1)
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """The CPUs this process can keep busy (at least 1): ``os.cpu_count()`` counts the node's, which a
    container limited to 2 of 64 cores would oversubscribe with threads and processes."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)
