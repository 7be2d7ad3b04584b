"""How many CPU threads torch uses: taken from what this process may really run on.

``torch`` sizes its intra-op pool from the host's core count. In a container limited by a CPU
quota (cgroup ``cpu.max``) or a CPU affinity mask, that oversubscribes the cores the process
actually gets, and every matmul then waits on its own threads. :func:`available_cpus` reads the
affinity mask and the cgroup quota; :func:`configure_torch_threads` applies the ``threads``
parameter (``auto``: that count) once per run (see ``fsad_pipeline.hooks``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: cgroup v2 and v1 files holding the CPU quota of this process's group.
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_limit(v2: Path = _CGROUP_V2, v1: tuple[Path, Path] = _CGROUP_V1) -> float | None:
    """The CPU quota in cores (e.g. 1.5), or None when there is none or it cannot be read."""
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = v1
        if quota_file.exists() and period_file.exists():
            quota = int(quota_file.read_text())
            return None if quota <= 0 else quota / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (at least 1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def configure_torch_threads(setting: int | str | None = "auto") -> int:
    """Set torch's intra-op threads: ``auto``/None = :func:`available_cpus`, an int = that many.

    Returns the count in use. Inter-op threads are left alone (they are fixed once work ran).
    """
    if setting in (None, "auto"):
        count = available_cpus()
    else:
        count = int(setting)
        if count < 1:
            raise ValueError(f"threads must be 'auto' or >= 1, got {setting!r}")
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
        logger.info("torch uses %d CPU threads", count)
    return count
