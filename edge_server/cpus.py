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

OpenMP's wait: with more than one thread, libgomp's threads spin (~300,000 rounds) at each barrier before they
sleep; where other processes share the cores (the testbed: UEs, relays and tc on the same 2 cores) a descheduled
thread then stalls the others at every barrier while they burn the CPU it waits for. Such a server should run
with ``OMP_WAIT_POLICY=PASSIVE`` (read by libgomp when torch loads, so set in the environment before the process
starts; the testbed's bench does). Measured (session 14, ``bench/bench_server_noise.py``, a loaded 2-core machine,
2 threads): p90 of one all-server request's compute 94 -> 54 ms (mobilenet_v2) and 275 -> 121 ms (resnet50).
The default rule gives 1 thread on 2 cores, where this does not arise.
"""

from __future__ import annotations

from profiler.device_info import usable_cores

__all__ = ["compute_threads", "usable_cores"]


def compute_threads(cores: int, workers: int = 1) -> int:
    """torch intra-op threads per compute worker for ``cores`` usable cores and ``workers`` workers
    (module docstring): ``max(1, (cores - 1) // workers)``, and 1 on a single core.
    Raises ValueError for ``cores`` or ``workers`` below 1."""
    if cores < 1 or workers < 1:
        raise ValueError(f"cores and workers must be >= 1, got cores={cores}, workers={workers}")
    if cores == 1:
        return 1
    return max(1, (cores - 1) // workers)
