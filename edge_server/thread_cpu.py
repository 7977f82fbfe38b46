"""CPU time of a compute thread together with the intra-op threads it runs torch's ops on.

``time.thread_time`` counts the calling thread only. With ``torch.get_num_threads() > 1`` an op that
parallelizes runs on the calling thread *and* on its OpenMP team, whose CPU time is not the caller's:
a ProfileGraph step metered with ``thread_time`` on a 2-thread server was charged 0.037 CPU s for
0.074 s of process CPU (50 relus of 256x1024 x 50 iterations, measured here; session 8), i.e. a tenant's
profiling took about ``threads`` times its budget.

How the team is found: GNU OpenMP (``libgomp``, which PyTorch's Linux wheels use, also for MKL and
oneDNN) keeps one pool of worker threads per thread that starts a parallel region, created by that
thread with ``pthread_create``; Linux gives a new thread its creator's name (``comm``). A compute
worker names itself uniquely (:func:`name_compute_thread`, before it runs any op), so its team carries
that name: :class:`ThreadCpu` reads the CPU clocks of the calling thread and of every thread of the
process with its name (``/proc/self/task/<tid>/comm``; a thread's CPU clock is
``clock_gettime(MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED))``, nanoseconds). A thread not named by
:func:`name_compute_thread` (e.g. a validation thread, whose torch work is on meta tensors) is metered
alone. Linux only; elsewhere (no ``/proc/self/task``) it is ``time.thread_time``.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

_PR_SET_NAME = 15
_TASKS = "/proc/self/task"
_seq = itertools.count()
_local = threading.local()


def _thread_clock(tid: int) -> int:
    """The Linux clock id of thread ``tid``'s CPU time (``MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)``:
    ``~tid << 3 | CPUCLOCK_PERTHREAD_MASK (4) | CPUCLOCK_SCHED (2)``, include/linux/posix-timers.h)."""
    return ((~tid) << 3) | 6


def _cpu_s(tid: int) -> float | None:
    """CPU seconds thread ``tid`` of this process has used; None once it has exited."""
    try:
        return time.clock_gettime(_thread_clock(tid))
    except OSError:
        return None


def name_compute_thread(prefix: str = "coinfer-cw") -> str | None:
    """Give the calling thread a process-unique OS name (``prefix`` + a counter, at most 15 bytes, Linux
    ``prctl(PR_SET_NAME)``) so that the intra-op threads it creates from now on carry it too and
    :class:`ThreadCpu` counts them. Call it before the thread runs any torch op. Returns the name, or
    None where it cannot be set (not Linux): the thread is then metered alone."""
    name = f"{prefix}{next(_seq)}"[:15]
    if not os.path.isdir(_TASKS):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_NAME, name.encode(), 0, 0, 0) != 0:
            return None
    except (OSError, AttributeError):
        return None
    _local.name = name
    return name


def _team(name: str, me: int, known: dict[int, bool]) -> list[int]:
    """Threads of this process named ``name`` other than ``me``; ``known`` caches tid -> named so (a
    thread's name is read once: nothing of ours renames a thread after it starts)."""
    try:
        tids = [int(t) for t in os.listdir(_TASKS)]
    except OSError:
        return []
    out = []
    for tid in tids:
        if tid == me:
            continue
        hit = known.get(tid)
        if hit is None:
            try:
                with open(f"{_TASKS}/{tid}/comm") as f:
                    hit = f.read().rstrip("\n") == name
            except OSError:  # exited meanwhile
                continue
            known[tid] = hit
        if hit:
            out.append(tid)
    alive = set(tids)
    for tid in [t for t in known if t not in alive]:  # tids are reused: forget the ones gone
        del known[tid]
    return out


class ThreadCpu:
    """CPU seconds spent by the calling thread and its intra-op team over a block (module docstring)::

        with ThreadCpu() as m:
            run_ops()
        m.cpu_s

    A team thread created inside the block counts from its start. Not reentrant; use one per block."""

    __slots__ = ("_me", "_name", "_start", "_t0", "cpu_s", "team")

    def __init__(self) -> None:
        self._name: str | None = getattr(_local, "name", None)
        self._me = threading.get_native_id()
        self._t0 = 0.0
        self._start: dict[int, float] = {}
        self.cpu_s = 0.0
        """CPU seconds of the block (set on exit)."""
        self.team = 0
        """How many team threads were counted (0: the thread alone)."""

    def _known(self) -> dict[int, bool]:
        known = getattr(_local, "known", None)
        if known is None:
            known = _local.known = {}
        return known

    def __enter__(self) -> ThreadCpu:
        self._t0 = time.thread_time()
        if self._name is not None:
            for tid in _team(self._name, self._me, self._known()):
                c = _cpu_s(tid)
                if c is not None:
                    self._start[tid] = c
        return self

    def __exit__(self, *exc: object) -> None:
        total = time.thread_time() - self._t0
        if self._name is not None:
            team = _team(self._name, self._me, self._known())
            for tid in team:
                c = _cpu_s(tid)
                if c is not None:
                    total += c - self._start.get(tid, 0.0)  # new in the block: all of its CPU
            self.team = len(team)
        self.cpu_s = total
