"""The server-wide memory budget for work in flight (``--memory-mb``).

The weight store and the staging area are bounded by their own capacities; everything else a client
can make the server hold (a request's intermediates and outputs until they are sent, a profile's
random weights and intermediates, an op's kernel scratch) is reserved here before it is allocated,
from the slice's estimated peak (``edge_server.op_budget``). A reservation over what is left is
refused with RESOURCE_EXHAUSTED at once (nothing waits holding memory), and no single holder (a
tenant, or a session before authentication names tenants) may take more than ``holder_fraction`` of
the budget, so one client cannot starve the others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from edge_server.errors import ResourceExhausted

if TYPE_CHECKING:
    from edge_server.profile_budget import TenantBucket

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["Bounds", "MemoryBudget", "MemoryStats", "Reservation"]


@dataclass(slots=True)
class MemoryStats:
    limit_bytes: int
    """0: unbounded."""
    reserved_bytes: int
    peak_bytes: int
    refused: int


class Reservation:
    """Bytes held against a :class:`MemoryBudget` until :meth:`release` (idempotent; also a context manager)."""

    __slots__ = ("_budget", "holder", "nbytes")

    def __init__(self, budget: MemoryBudget, holder: str, nbytes: int) -> None:
        self._budget: MemoryBudget | None = budget
        self.holder = holder
        self.nbytes = nbytes

    def release(self) -> None:
        b, self._budget = self._budget, None
        if b is not None:
            b._release(self.holder, self.nbytes)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MemoryBudget:
    """Thread-safe byte budget. ``limit_bytes`` 0 means unbounded (reservations are still counted)."""

    def __init__(self, limit_bytes: int, *, holder_fraction: float = 0.5) -> None:
        if limit_bytes < 0:
            raise ValueError("limit_bytes must be >= 0")
        self.limit_bytes = limit_bytes
        self.holder_fraction = holder_fraction
        self._lock = threading.Lock()
        self._reserved = 0
        self._by_holder: dict[str, int] = {}
        self._peak = 0
        self._refused = 0

    def reserve(self, holder: str, nbytes: int, what: str) -> Reservation:
        """Hold ``nbytes`` for ``holder``; raises :class:`ResourceExhausted` naming ``what`` if over."""
        nbytes = max(int(nbytes), 0)
        with self._lock:
            if self.limit_bytes:
                mine = self._by_holder.get(holder, 0)
                cap = int(self.limit_bytes * self.holder_fraction)
                if self._reserved + nbytes > self.limit_bytes or mine + nbytes > cap:
                    self._refused += 1
                    free = self.limit_bytes - self._reserved
                    raise ResourceExhausted(
                        f"{what} needs about {nbytes / 2**20:.0f} MiB of working memory; the server has "
                        f"{max(free, 0) / 2**20:.0f} MiB free for work in flight and one client may hold at most "
                        f"{cap / 2**20:.0f} MiB (it holds {mine / 2**20:.0f} MiB)"
                    )
            self._reserved += nbytes
            self._by_holder[holder] = self._by_holder.get(holder, 0) + nbytes
            self._peak = max(self._peak, self._reserved)
        return Reservation(self, holder, nbytes)

    def charge(self, holder: str, nbytes: int) -> Reservation:
        """Count bytes that already exist (e.g. an output waiting to be sent): never refused."""
        nbytes = max(int(nbytes), 0)
        with self._lock:
            self._reserved += nbytes
            self._by_holder[holder] = self._by_holder.get(holder, 0) + nbytes
            self._peak = max(self._peak, self._reserved)
        return Reservation(self, holder, nbytes)

    def _release(self, holder: str, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes
            left = self._by_holder.get(holder, 0) - nbytes
            if left > 0:
                self._by_holder[holder] = left
            else:
                self._by_holder.pop(holder, None)

    def held_by(self, holder: str) -> int:
        with self._lock:
            return self._by_holder.get(holder, 0)

    def stats(self) -> MemoryStats:
        with self._lock:
            return MemoryStats(self.limit_bytes, self._reserved, self._peak, self._refused)


class Bounds:
    """The server's resource bounds as sessions and requests see them: the in-flight memory budget,
    the per-op limits checked when a slice is compiled, the output bytes a session may leave unsent,
    and a record of work stopped by a cancel (ops that finished after it: at most one per run)."""

    def __init__(self, memory: MemoryBudget | None = None, op_limits=None, output_buffer_bytes: int = 16 << 20):
        from edge_server.op_budget import OpLimits

        self.memory = memory or MemoryBudget(0)
        self.op_limits = op_limits or OpLimits()
        self.output_buffer_bytes = output_buffer_bytes
        self._lock = threading.Lock()
        self.compile_slots = asyncio.Semaphore(1)
        """Slice validations running at once (each holds the GIL for most of its time: several in
        parallel starve the event loop and the compute workers of every other tenant)."""
        self.ops_after_cancel = 0
        """Ops of cancelled or abandoned work (requests, profiles) that finished after the cancel."""
        self.stopped_runs = 0
        """Cancelled or abandoned runs whose last compute step has ended."""
        self.validation_bucket: Callable[[str], TenantBucket] | None = None
        """Tenant -> the bucket its sessions' slice validations are charged to (the runtime's slice validation
        budget, ``edge_server.profile_budget``); None: no budget."""

    async def compile(self, fn: Callable[[Callable[[], None] | None], T], bucket: TenantBucket | None = None) -> T:
        """Run ``fn(check)`` (a slice validation: CPU-bound Python) on a thread, one at a time server-wide.

        The slot is held until the thread ends, also when the caller is cancelled (an abandoned
        ProfileGraph or session): the thread cannot be stopped, so releasing the slot at the cancel
        let the next validation start beside it, and abandoned calls piled up validations that ran
        at once (a 20k-op one is about a CPU second of the GIL each).

        With ``bucket`` (a tenant's CPU bucket, ``edge_server.profile_budget.TenantBucket``): admitted before
        waiting for the slot and again once it holds it (the calls queued behind the slot were admitted while the
        bucket still held CPU time), the thread's CPU time charged to it, and ``check`` raises once it is spent
        (``CpuMeter.check``: ``fn`` passes it to ``compile_slice``, which stops mid-way); without, ``check`` is
        None. Raises what ``fn`` raises, and ``ProfileBudgetExceeded`` (RESOURCE_EXHAUSTED)."""
        from edge_server.profile_budget import CpuMeter

        def job() -> T:
            if bucket is None:
                return fn(None)
            bucket.admit()
            with CpuMeter(bucket.budget, bucket.tenant) as meter:
                return fn(meter.check)

        if bucket is not None:
            bucket.admit()
        await self.compile_slots.acquire()
        try:
            fut = asyncio.ensure_future(asyncio.to_thread(job))
        except BaseException:
            self.compile_slots.release()
            raise

        def done(f: asyncio.Future) -> None:
            self.compile_slots.release()
            if not f.cancelled():
                f.exception()  # retrieved: the caller may have gone away

        fut.add_done_callback(done)
        return await asyncio.shield(fut)

    def count_stopped(self, late_ops: int) -> None:
        with self._lock:
            self.ops_after_cancel += late_ops
            self.stopped_runs += 1
