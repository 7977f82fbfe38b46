"""How many CPU threads the edge server's compute may use: the default ``--threads`` rule.

The server runs a device's compute on ``workers`` worker threads (``ServerConfig.workers``, one by
default; sessions share them by fair queuing, ``edge_server.scheduler``), each op on torch's intra-op
thread pool. Beside them run the event loop and gRPC's threads (receiving weight chunks and request
tensors, hashing, sending outputs) and at most one slice validation at a time. torch's own default is
one intra-op thread per core, which leaves nothing for that I/O: while a request computes, the
uploads of every other session wait for a core (OpenMP threads spin before they sleep), and a second
worker would double the oversubscription.

The rule (:func:`compute_threads`): with C cores usable by this process (affinity mask, and a cgroup
CPU quota rounded up, :func:`usable_cores`) and W workers,

    intra-op threads per worker = max(1, (C - 1) // W)   when C >= 2,   1 when C = 1

so the compute never takes more than C - 1 cores and one core stays for the event loop, gRPC and
validation. An explicit ``--threads N`` overrides it (N per worker).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def compute_threads(cores: int, workers: int = 1) -> int:
    """torch intra-op threads per compute worker for ``cores`` usable cores and ``workers`` workers
    (module docstring): ``max(1, (cores - 1) // workers)``, and 1 on a single core.
    Raises ValueError for ``cores`` or ``workers`` below 1."""
    if cores < 1 or workers < 1:
        raise ValueError(f"cores and workers must be >= 1, got cores={cores}, workers={workers}")
    if cores == 1:
        return 1
    return max(1, (cores - 1) // workers)


def usable_cores(proc_root: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """Cores this process may use: the scheduler affinity mask, capped by a CFS quota of its cgroup
    (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up to whole cores).
    At least 1; a quota that cannot be read counts as none."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _quota_cores(Path(proc_root), Path(cgroup_root))
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)


def _quota_cores(proc_root: Path, cgroup_root: Path) -> float | None:
    """The CPU quota of this process's cgroup in cores (quota / period), None when unlimited or unknown."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        try:
            if controllers == "":  # v2 unified hierarchy
                f = cgroup_root / rel / "cpu.max"
                if f.exists():
                    quota, period = f.read_text().split()[:2]
                    if quota != "max":
                        return int(quota) / int(period)
            elif "cpu" in controllers.split(","):
                base = cgroup_root / controllers / rel
                if not base.exists():
                    base = cgroup_root / "cpu" / rel
                q = base / "cpu.cfs_quota_us"
                if q.exists():
                    quota = int(q.read_text())
                    if quota > 0:
                        return quota / int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError, ZeroDivisionError) as e:
            logger.debug("cannot read the CPU quota of cgroup %s: %s", path, e)
    return None
