"""Fair sharing of the server's compute among sessions.

One pool of worker threads per device (default: one worker, so a GPU or the CPU's intra-op thread
pool is not oversubscribed). Each session submits small compute tasks (a run of ready ops, bounded in
time); the workers pick the next task by start-time fair queuing over per-session queues: a session's
virtual time advances by ``run time / share``, and the session with the smallest virtual time goes
next. Shares come from a :class:`edge_server.allocation.ShareAllocator` (equal by default), so a
session with twice the share gets about twice the compute when both are busy, and an idle session
does not bank credit.

Two levels: tenants (groups) first, then sessions inside a tenant. A tenant that wakes up (had nothing
queued) starts at most ``wake_credit_ms`` of virtual time behind the tenant served last (the "sleeper
credit" of Linux CFS, bounded so it cannot be banked), and a running task of another tenant ends its
time slice at its next op boundary once its tenant's virtual time, counting the running slice, is ahead
of a waiting tenant's by more than ``preempt_granularity_ms``. So a light tenant's short request runs
as soon as the op in progress ends and then to completion, instead of alternating op by op with a
heavy tenant's backlog (one hand-off per op: a victim's 5 ms request took 28 ms beside abandoned
profiles, issue 11); a tenant that stays busy gets its fair share, no more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_server.thread_cpu import name_compute_thread

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TaskResult:
    value: Any
    queued_ms: float
    """Time from submit to start (waiting for a worker: other sessions' work)."""
    run_ms: float


@dataclass(slots=True)
class _Task:
    fn: Callable[[], Any]
    future: concurrent.futures.Future
    submitted: float


@dataclass(slots=True)
class SchedulerStats:
    workers: int = 0
    tasks_run: int = 0
    busy_ms: float = 0.0
    queued_tasks: int = 0


class ComputeScheduler:
    def __init__(
        self,
        workers: int = 1,
        *,
        name: str = "coinfer-compute",
        wake_credit_ms: float = 5.0,
        preempt_granularity_ms: float = 1.0,
    ) -> None:
        """``workers`` threads; ``wake_credit_ms``: how far behind the tenant served last a waking
        tenant may start (virtual ms); ``preempt_granularity_ms``: the virtual-time lead over a waiting
        tenant at which a running task yields (hysteresis against op-by-op ping-pong). Raises
        ValueError for ``workers < 1`` or negative times."""
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if wake_credit_ms < 0 or preempt_granularity_ms < 0:
            raise ValueError("wake_credit_ms and preempt_granularity_ms must be >= 0")
        self._wake_credit_ms = float(wake_credit_ms)
        self._granularity_ms = float(preempt_granularity_ms)
        self._running: dict[int, tuple[str, float]] = {}
        """Worker thread id -> (key, start time) of the task it runs (for the running slice's share of
        its tenant's virtual time in :meth:`contended`)."""
        self._cv = threading.Condition()
        self._queues: dict[str, deque[_Task]] = {}
        self._vtime: dict[str, float] = {}
        self._shares: dict[str, float] = {}
        self._key_clock: dict[str, float] = {}
        """Per group: the virtual time of its key served last (a key joining the group starts there)."""
        self._group_of: dict[str, str] = {}
        self._group_vtime: dict[str, float] = {}
        self._group_shares: dict[str, float] = {}
        self._group_clock = 0.0
        self._closed = False
        self._queued: dict[str, int] = {}
        """Group -> its tasks waiting for a worker (see :meth:`contended`)."""
        self._stats = SchedulerStats(workers=workers)
        self._busy_ms: dict[str, float] = {}
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- configuration -------------------------------------------------------------------------------

    def set_shares(self, shares: dict[str, float]) -> None:
        with self._cv:
            self._shares = {k: max(float(v), 1e-6) for k, v in shares.items()}

    def set_group(self, key: str, group: str) -> None:
        """Put ``key`` (a session) in ``group`` (its tenant) for the first level of fair queuing."""
        with self._cv:
            self._group_of[key] = group

    def set_group_shares(self, shares: dict[str, float]) -> None:
        """Relative compute shares of groups (default 1 each: tenants share equally)."""
        with self._cv:
            self._group_shares = {k: max(float(v), 1e-6) for k, v in shares.items()}

    def _group(self, key: str) -> str:
        return self._group_of.get(key, "")

    def share(self, key: str) -> float:
        with self._cv:
            return self._shares.get(key, 1.0)

    def quantum_ms(self, key: str, base_ms: float) -> float:
        """Time slice for one task of ``key``: ``base_ms`` scaled by its share relative to an equal one.

        Fair queuing alone cannot favour a session that never has more than one task queued (the
        worker takes whatever is waiting); scaling its slices keeps the compute ratio at the share ratio
        (deficit-round-robin style). Clamped to [base/4, base*4].
        """
        with self._cv:
            n = len(self._shares)
            share = self._shares.get(key)
        if not n or share is None:
            return base_ms
        return min(max(base_ms * share * n, base_ms / 4), base_ms * 4)

    # -- submission ----------------------------------------------------------------------------------

    def submit(self, key: str, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Queue ``fn`` for session ``key``; the future resolves to a :class:`TaskResult`."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            q = self._queues.setdefault(key, deque())
            if not q:  # (re)activated: no credit for the time it was idle
                g = self._group(key)
                self._vtime[key] = max(self._vtime.get(key, 0.0), self._key_clock.get(g, 0.0))
                if not any(self._queues.get(k) for k in self._queues if k != key and self._group(k) == g):
                    woken = self._group_clock - self._wake_credit_ms
                    self._group_vtime[g] = max(self._group_vtime.get(g, woken), woken)
            q.append(_Task(fn, fut, time.perf_counter()))
            g = self._group(key)
            self._queued[g] = self._queued.get(g, 0) + 1
            self._cv.notify()
        return fut

    def contended(self, key: str) -> bool:
        """True while a task of another group (tenant) than ``key``'s waits for a worker and is owed
        compute: its virtual time is behind that of ``key``'s group (counting the slice the calling
        worker is running for ``key``) by more than the preemption granularity. A running task of ``key``
        checks it at each op boundary and ends its time slice early: a tenant that is behind waits at
        most one op of the running work, not a whole slice. Work of one tenant does not preempt itself
        (that would only add hand-offs), nor does a tenant that is already ahead."""
        with self._cv:
            g = self._group(key)
            waiting = [other for other, n in self._queued.items() if n and other != g]
            if not waiting:
                return False
            mine = self._group_vtime.get(g, self._group_clock)
            current = self._running.get(threading.get_ident())
            if current is not None and current[0] == key:
                mine += (time.perf_counter() - current[1]) * 1e3 / self._group_shares.get(g, 1.0)
            return any(self._group_vtime.get(o, self._group_clock) + self._granularity_ms < mine for o in waiting)

    def _dequeued(self, key: str) -> None:
        g = self._group(key)
        n = self._queued.get(g, 0) - 1
        if n > 0:
            self._queued[g] = n
        else:
            self._queued.pop(g, None)

    async def run(self, key: str, fn: Callable[[], Any]) -> TaskResult:
        """Run ``fn`` on a worker in the session's turn; cancelling the await drops it if not started."""
        return await asyncio.wrap_future(self.submit(key, fn))

    def drop(self, key: str) -> None:
        """Forget a session: cancel its queued tasks (a running one finishes, its result is ignored)."""
        with self._cv:
            for task in self._queues.pop(key, ()):
                task.future.cancel()
                self._dequeued(key)
            self._vtime.pop(key, None)
            self._busy_ms.pop(key, None)
            g = self._group_of.pop(key, "")
            if not any(self._group(k) == g for k in self._queues):
                self._group_vtime.pop(g, None)
                self._key_clock.pop(g, None)

    def charge(self, key: str, ms: float) -> None:
        """Count ``ms`` of CPU spent for session ``key`` off the workers (ARA's re-plans of its profile on the
        planner thread) in its fair turn: its and its tenant's virtual times advance as if it had computed
        that long here (from where a waking session and tenant would start, so a charge is not lost while
        the session is idle). Its next tasks then wait while tenants behind it have work; alone, it runs
        (work-conserving). Not counted in :meth:`busy_ms` (no worker ran it)."""
        if not ms > 0:
            return
        with self._cv:
            if self._closed or key not in self._group_of:  # (a session already dropped: nothing to charge)
                return
            g = self._group(key)
            self._vtime[key] = max(self._vtime.get(key, 0.0), self._key_clock.get(g, 0.0)) + ms / self._shares.get(
                key, 1.0
            )
            woken = self._group_clock - self._wake_credit_ms
            self._group_vtime[g] = max(self._group_vtime.get(g, woken), woken) + ms / self._group_shares.get(g, 1.0)

    def busy_ms(self, key: str) -> float:
        with self._cv:
            return self._busy_ms.get(key, 0.0)

    def stats(self) -> SchedulerStats:
        with self._cv:
            s = self._stats
            return SchedulerStats(s.workers, s.tasks_run, s.busy_ms, sum(len(q) for q in self._queues.values()))

    def close(self, wait: bool = True) -> None:
        with self._cv:
            self._closed = True
            for q in self._queues.values():
                for task in q:
                    task.future.cancel()
            self._queues.clear()
            self._queued.clear()
            self._cv.notify_all()
        if wait:
            for t in self._threads:
                t.join(timeout=30)

    # -- workers -------------------------------------------------------------------------------------

    def _next(self) -> tuple[str, _Task] | None:
        with self._cv:
            while True:
                if self._closed:
                    return None
                ready = [k for k, q in self._queues.items() if q]
                if ready:
                    groups: dict[str, list[str]] = {}
                    for k in ready:
                        groups.setdefault(self._group(k), []).append(k)
                    g = min(groups, key=lambda g: self._group_vtime.get(g, 0.0))
                    self._group_clock = max(self._group_clock, self._group_vtime.get(g, 0.0))
                    key = min(groups[g], key=lambda k: self._vtime.get(k, 0.0))
                    self._key_clock[g] = max(self._key_clock.get(g, 0.0), self._vtime.get(key, 0.0))
                    self._dequeued(key)
                    return key, self._queues[key].popleft()
                self._cv.wait()

    def _loop(self) -> None:
        name_compute_thread()  # before any op: its intra-op threads carry the name (ProfileGraph's CPU meter)
        while True:
            picked = self._next()
            if picked is None:
                return
            key, task = picked
            if not task.future.set_running_or_notify_cancel():
                continue
            start = time.perf_counter()
            me = threading.get_ident()
            with self._cv:
                self._running[me] = (key, start)
            try:
                value = task.fn()
            except BaseException as e:
                task.future.set_exception(e)
                value = None
                ok = False
            else:
                ok = True
            end = time.perf_counter()
            run_ms = (end - start) * 1e3
            with self._cv:
                self._running.pop(me, None)
                if key in self._vtime:
                    self._vtime[key] += run_ms / self._shares.get(key, 1.0)
                    self._busy_ms[key] = self._busy_ms.get(key, 0.0) + run_ms
                g = self._group(key)
                if g in self._group_vtime:
                    self._group_vtime[g] += run_ms / self._group_shares.get(g, 1.0)
                self._stats.tasks_run += 1
                self._stats.busy_ms += run_ms
            if ok:
                task.future.set_result(TaskResult(value, (start - task.submitted) * 1e3, run_ms))
            # not held by this idle frame until the next task (a profile's parsed cost graph, a request's outputs)
            task = value = picked = None
