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
import ctypes
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from edge_server.errors import ResourceExhausted

if TYPE_CHECKING:
    from edge_server.profile_budget import TenantBucket

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["Bounds", "MemoryBudget", "MemoryStats", "Reservation", "Trimmer", "ValidationSlot"]


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
        self._pool_prefix = ""
        self._pool_cap = 0
        self._pool_held = 0

    def pool(self, prefix: str, cap_bytes: int) -> None:
        """Holders whose name starts with ``prefix`` together hold at most ``cap_bytes`` (bytes; each still at most
        its ``holder_fraction``): the server pools every ``peer:HOST`` holder this way when it has tokens, so callers
        without one (their refused calls' receive windows, health calls) cannot fill the budget tenants need by
        coming from many addresses (review23 F1). One pool per budget; ``cap_bytes`` <= 0 removes it. Does not
        count what pooled holders hold already: call it before any reservation."""
        with self._lock:
            self._pool_prefix = prefix if cap_bytes > 0 else ""
            self._pool_cap = max(int(cap_bytes), 0)

    def pooled_bytes(self) -> int:
        """Bytes the pooled holders (:meth:`pool`) hold now together; 0 without a pool."""
        with self._lock:
            return self._pool_held

    def _pooled(self, holder: str) -> bool:
        return bool(self._pool_prefix) and holder.startswith(self._pool_prefix)

    def _add(self, holder: str, nbytes: int) -> None:
        """Under the lock: count ``nbytes`` (may be negative) for ``holder``."""
        self._reserved += nbytes
        if self._pooled(holder):
            self._pool_held += nbytes
        left = self._by_holder.get(holder, 0) + nbytes
        if left > 0:
            self._by_holder[holder] = left
        else:
            self._by_holder.pop(holder, None)
        self._peak = max(self._peak, self._reserved)

    def reserve(self, holder: str, nbytes: int, what: str) -> Reservation:
        """Hold ``nbytes`` for ``holder``; raises :class:`ResourceExhausted` naming ``what`` if over."""
        nbytes = max(int(nbytes), 0)
        with self._lock:
            if not self._room(holder, nbytes):
                self._refused += 1
                free = self.limit_bytes - self._reserved
                pooled = (f"; callers without a token may hold at most {self._pool_cap / 2**20:.0f} MiB together "
                          f"(they hold {self._pool_held / 2**20:.0f} MiB)" if self._pooled(holder) else "")
                raise ResourceExhausted(
                    f"{what} needs about {nbytes / 2**20:.0f} MiB of working memory; the server has "
                    f"{max(free, 0) / 2**20:.0f} MiB free for work in flight and one client may hold at most "
                    f"{self._cap() / 2**20:.0f} MiB (it holds {self._by_holder.get(holder, 0) / 2**20:.0f} MiB)"
                    + pooled
                )
            self._add(holder, nbytes)
        return Reservation(self, holder, nbytes)

    def fits(self, holder: str, nbytes: int) -> bool:
        """Whether :meth:`reserve` of ``nbytes`` for ``holder`` would succeed now (it reserves nothing: another
        thread may take the room before a reservation does)."""
        with self._lock:
            return self._room(holder, max(int(nbytes), 0))

    def _cap(self) -> int:
        return int(self.limit_bytes * self.holder_fraction)

    def _room(self, holder: str, nbytes: int) -> bool:
        """Under the lock: ``nbytes`` more for ``holder`` stay within the limit and the holder's share of it."""
        return not self.limit_bytes or (self._reserved + nbytes <= self.limit_bytes
                                        and self._by_holder.get(holder, 0) + nbytes <= self._cap()
                                        and (not self._pooled(holder) or self._pool_held + nbytes <= self._pool_cap))

    def charge(self, holder: str, nbytes: int) -> Reservation:
        """Count bytes that already exist (e.g. an output waiting to be sent): never refused."""
        nbytes = max(int(nbytes), 0)
        with self._lock:
            self._add(holder, nbytes)
        return Reservation(self, holder, nbytes)

    def _release(self, holder: str, nbytes: int) -> None:
        with self._lock:
            self._add(holder, -nbytes)

    def held_by(self, holder: str) -> int:
        with self._lock:
            return self._by_holder.get(holder, 0)

    def stats(self) -> MemoryStats:
        with self._lock:
            return MemoryStats(self.limit_bytes, self._reserved, self._peak, self._refused)

    def holders(self) -> dict[str, int]:
        """Holder -> bytes it holds now (a copy; holders holding nothing are absent)."""
        with self._lock:
            return dict(self._by_holder)


class Trimmer:
    """Gives the heap's free memory back to the system once big transient buffers (a received request of MiBs, a
    slice validation's working memory) are freed: glibc's ``malloc_trim(0)`` on a thread of its own, after
    ``threshold_bytes`` of such buffers were released (:meth:`note`), at most once per ``min_interval_s``.

    Why: glibc raises its mmap threshold to the size of the biggest mmapped block freed so far (up to 32 MiB,
    ``mallopt(3)``, M_MMAP_THRESHOLD's dynamic adjustment), so after the first big request the next ones are served
    from the heap's arenas, and the freed space stays in the process: 48 OpenSessions of 4 MiB one after another left
    +92 MiB of RSS after they ended, +2 MiB after one ``malloc_trim(0)`` (2.4 ms; session 20,
    ``docs/results/attack/session20/``). Noted: a decoded request's held bytes when its handler drops it
    (``CallGate.drop_request``), a stream's next-read bytes (the 8 MiB message limit) at the end of every stream
    past its first message (``CallGate.leave``), and a slice validation's working memory; never a request's
    tensors: a trim after each inference would make its next one fault its pages in again.

    ``malloc_trim`` is glibc's; elsewhere (musl, macOS) :meth:`note` does nothing. The thread starts on the first
    trim; :meth:`close` ends it."""

    def __init__(self, threshold_bytes: int = 16 << 20, min_interval_s: float = 0.2) -> None:
        self.threshold_bytes, self.min_interval_s = threshold_bytes, min_interval_s
        self._lock = threading.Lock()
        self._freed = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.trims = 0
        """Trims done since start."""
        self._trim = _malloc_trim()

    def note(self, nbytes: int) -> None:
        """``nbytes`` of a big transient buffer were freed (or are about to be): trim once enough were. Thread-safe,
        never blocks (the trim runs on the trimmer's thread)."""
        if self._trim is None or nbytes <= 0:
            return
        with self._lock:
            self._freed += nbytes
            if self._freed < self.threshold_bytes or self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                if self._closed:
                    return
                self._wake.clear()
                self._freed = 0
            time.sleep(0.02)  # let the frees of the call that ended happen (grpc drops its buffers after our code)
            self._trim(0)  # a ctypes call: the GIL is released while it runs
            self.trims += 1
            time.sleep(self.min_interval_s)

    def close(self) -> None:
        """Stop the thread (the server stopped)."""
        with self._lock:
            self._closed = True
        self._wake.set()


def _malloc_trim():
    """glibc's ``malloc_trim`` (int -> int), or None where the C library has none."""
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the process's own symbols: the C library's, where it has one
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


ROOM_WAIT_S = 5.0
"""Seconds a slice validation whose working memory does not fit beside the paused ones' lets others that fit go past
it; after, each other tenant may pass it once more and then the paused drain for it (:class:`ValidationSlot`)."""


class _Waiter:
    """A validation waiting for the slot: its tenant, how to wake it, and the working memory it reserves when it
    starts (``holder``, ``hold_bytes``; a paused one holds its reservation already)."""

    __slots__ = ("grant", "hold_bytes", "holder", "passed_by", "paused", "since", "tenant")

    def __init__(self, tenant: str, grant: Callable[[], None], holder: str = "", hold_bytes: int = 0,
                 paused: bool = False) -> None:
        self.tenant, self.grant = tenant, grant
        self.holder, self.hold_bytes, self.paused = holder, hold_bytes, paused
        self.since = time.monotonic()
        self.passed_by: set[str] = set()
        """Tenants whose validation started past this one after its wait for room ran out (each may once)."""


class ValidationSlot:
    """The one slice validation that runs at a time, server-wide, shared in turns between tenants.

    A validation is CPU-bound Python that holds the GIL for most of its time: several at once starve the event loop
    and every tenant's compute workers, so one runs. Held by one validation to its end (or its tenant's budget's),
    bob's 3-op slice waited 10.5 s behind alice's 50k-op one (review18 F6). Now the running validation's thread gives
    the slot up at its next check point (:meth:`yield_point`; ``modelgraph.slice.validate`` calls its ``check``
    every ``CHECK_EVERY_META_RUNS`` meta-kernel runs, ~10-25 ms of CPU) when another tenant waits, and waits for its
    turn again. Turns go round-robin between the tenants that wait (processor sharing by quanta: Kleinrock,
    "Queueing Systems" vol. 2, 1976, section 4.4), a tenant's own validations one after another, a paused one
    first: so each tenant has at most one validation started and unfinished, and a small slice waits about one
    check interval per tenant ahead of it. At most ``max_paused`` validations wait paused at once (each holds its
    thread, and its working memory in the memory budget: ``Bounds.compile``'s ``hold_bytes``, so fewer where the
    budget does not fit more); with that many, the running one goes on to its end as before. A turn goes only to a
    validation that can run: a paused one, or one whose working memory fits the budget beside the paused ones'
    (``fits``, the memory budget's check): handing it to one that does not fit refused it RESOURCE_EXHAUSTED although
    it fitted alone, only because the turns had paused another (review20 F6); such a one waits for a turn in which
    it fits, and others that fit go past it (a small slice is not held behind a big one waiting for room: with the
    big one blocking the turns until the paused drained, an honest tenant's small ProfileGraph waited 11-15 s
    behind 16 attackers' 6.45 MiB ones, bound20). Its wait is bounded: after ``room_wait_s`` each other tenant may
    start one more validation past it, and then only paused ones run (they drain) until it fits or nothing is paused;
    then it gets its turn (a refusal then is its own: no validation holds memory). Granting it the turn at
    ``room_wait_s`` whether it fitted or not refused validations that fitted alone under sustained load (review20b
    F3: 7-15 of 40).

    :meth:`acquire` is awaited on the event loop; :meth:`release` and :meth:`yield_point` are called from the
    validating thread (thread-safe)."""

    def __init__(self, max_paused: int = 16, fits: Callable[[str, int], bool] | None = None,
                 room_wait_s: float = ROOM_WAIT_S) -> None:
        self.max_paused = max_paused
        self.fits = fits
        """(holder, bytes) -> whether a validation's working memory fits the budget now (None: always)."""
        self.room_wait_s = room_wait_s
        """Seconds a validation whose working memory does not fit waits for a turn in which it does."""
        self._lock = threading.Lock()
        self._holder: str | None = None
        """The tenant whose validation holds the slot (None: free)."""
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        """Tenant -> its waiters, oldest first (a paused validation at the front); tenants in turn order."""
        self._paused = 0
        self._resumes: set[threading.Event] = set()
        """The paused validations' wake-ups (all set by :meth:`close`)."""
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self.yields = 0
        """Times a validation gave the slot up to another tenant's, since start."""

    def executor(self) -> ThreadPoolExecutor:
        """The validations' threads: ``max_paused`` + 2 at most (the paused ones hold theirs, one runs: never a
        running validation without a thread). Its own pool, not the loop's default one, which paused validations
        could fill; and a pool, not a thread per validation: each new thread took a malloc arena of its own and
        the server's RSS grew with them (48 refused 4 MiB OpenSessions one after another: +146 MiB, +98 with
        the loop's pool)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_paused + 2, thread_name_prefix="slice-validation")
        return self._pool

    def close(self) -> None:
        """The server stopped: the paused validations resume (their turn may never come: its grant can go to a
        loop that no longer runs, and the interpreter's exit waits for the pool's threads), none pauses again,
        and the pool's idle threads go (a validation still running ends on its own)."""
        with self._lock:
            self._closed = True
            resumes = list(self._resumes)
        for resume in resumes:
            resume.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def counts(self) -> tuple[int, int, int]:
        """(validations running: 0 or 1, paused (holding their working memory), waiting for their first turn)."""
        with self._lock:
            waiting = sum(1 for q in self._queues.values() for w in q if not w.paused)
            return (0 if self._holder is None else 1), self._paused, waiting

    @property
    def idle(self) -> bool:
        """No validation holds the slot and none waits."""
        with self._lock:
            return self._holder is None and not self._queues

    async def acquire(self, tenant: str, holder: str = "", hold_bytes: int = 0) -> None:
        """Wait for the slot for a validation of ``tenant`` (its turn among the tenants waiting) that will reserve
        ``hold_bytes`` for ``holder`` once it runs. Cancelled, it is left (or, granted meanwhile, passed on)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._holder is None and not self._queues:
                self._holder = tenant
                return
            fut = loop.create_future()

            def grant() -> None:
                try:
                    loop.call_soon_threadsafe(self._granted, fut)
                except RuntimeError:  # the loop closed (server stopped): nobody takes it, pass it on
                    self.release()

            waiter = _Waiter(tenant, grant, holder, hold_bytes)
            self._queues.setdefault(tenant, deque()).append(waiter)
        try:
            await fut
        except BaseException:
            with self._lock:
                q = self._queues.get(tenant)
                if q is not None and waiter in q:  # not granted: leave the queue
                    q.remove(waiter)
                    if not q:
                        del self._queues[tenant]
                    raise
            if fut.done() and not fut.cancelled():  # granted, then cancelled before it ran: pass it on
                self.release()
            raise  # (granted and the future cancelled: ``_granted`` passes it on)

    def _granted(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self.release()
        else:
            fut.set_result(None)

    def _fits(self, waiter: _Waiter) -> bool:
        return self.fits is None or waiter.hold_bytes <= 0 or self.fits(waiter.holder, waiter.hold_bytes)

    def _next(self, skip: str | None = None, must_run: bool = False) -> _Waiter | None:
        """Under the lock: the next waiter, taken from its queue (it goes to the end of the turn order if it has
        more): the first tenant's in turn order, not ``skip``'s, whose front waiter is paused, or fits and is not
        held back by a waiter before it whose wait for room ran out and which its tenant has passed once already.
        With none: None, or (``must_run``, the slot is free) the first tenant's: no paused one waits then (a paused one
        is always picked), so whether it fits is its own."""
        if not self._queues:
            return None
        now, pick, barriers = time.monotonic(), None, []
        for t, q in self._queues.items():
            if t == skip:
                continue
            w = q[0]
            if w.paused:
                pick = t
                break
            if self._fits(w):
                if all(t not in b.passed_by for b in barriers):
                    for b in barriers:
                        b.passed_by.add(t)
                    pick = t
                    break
            elif now - w.since >= self.room_wait_s:
                barriers.append(w)
        if pick is None:
            if not must_run:
                return None
            pick = next(iter(self._queues))
        q = self._queues[pick]
        waiter = q.popleft()
        if q:
            self._queues.move_to_end(pick)
        else:
            del self._queues[pick]
        return waiter

    def release(self) -> None:
        """The holder's validation ended: the slot goes to the next tenant's turn (or is free)."""
        with self._lock:
            waiter = self._next(must_run=True)  # (a paused one first if any, as _next picks)
            self._holder = None if waiter is None else waiter.tenant
        if waiter is not None:
            waiter.grant()

    def yield_point(self, tenant: str) -> None:
        """In the running validation's thread, at a check point: if another tenant's validation waits that can run
        (:meth:`_next`: this one keeps its working memory while paused), give it the slot and block until this
        validation's turn comes again. ~0.1 us when nobody waits."""
        if not self._queues:  # (read without the lock: a waiter that just came is seen at the next point)
            return
        with self._lock:
            if self._closed or self._paused >= self.max_paused or all(t == tenant for t in self._queues):
                return
            waiter = self._next(skip=tenant)
            if waiter is None:  # every other tenant's next one needs room this one's working memory holds
                return
            self._holder = waiter.tenant
            resume = threading.Event()
            self._resumes.add(resume)
            me = _Waiter(tenant, resume.set, paused=True)
            q = self._queues.get(tenant)
            if q is None:
                self._queues[tenant] = deque((me,))
            else:
                q.appendleft(me)  # before the tenant's validations not yet started
                self._queues.move_to_end(tenant)
            self._paused += 1
            self.yields += 1
        waiter.grant()
        resume.wait()
        with self._lock:
            self._paused -= 1
            self._resumes.discard(resume)


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
        self.compile_slots = ValidationSlot(fits=lambda holder, n: self.memory.fits(holder, n))
        """The one slice validation running at a time, in turns between tenants (:class:`ValidationSlot`)."""
        self.trimmer = Trimmer()
        """Gives freed heap back to the system after big validations and strangers' big requests (:class:`Trimmer`)."""
        self.ops_after_cancel = 0
        """Ops of cancelled or abandoned work (requests, profiles) that finished after the cancel."""
        self.stopped_runs = 0
        """Cancelled or abandoned runs whose last compute step has ended."""
        self.validation_bucket: Callable[[str], TenantBucket] | None = None
        """Tenant -> the bucket its sessions' slice validations are charged to (the runtime's slice validation
        budget, ``edge_server.profile_budget``); None: no budget."""

    async def compile(self, fn: Callable[[Callable[[], None] | None], T], bucket: TenantBucket | None = None, *,
                      hold_bytes: int = 0, holder: str = "", what: str = "a slice validation") -> T:
        """Run ``fn(check)`` (a slice validation: CPU-bound Python) on a thread, one at a time
        server-wide, in turns between tenants (:class:`ValidationSlot`: ``check`` gives the slot up to another
        tenant's validation waiting and waits for its turn again).

        The slot is held until the thread ends, also when the caller is cancelled (an abandoned
        ProfileGraph or session): the thread cannot be stopped, so releasing the slot at the cancel
        let the next validation start beside it, and abandoned calls piled up validations that ran
        at once (a 20k-op one is about a CPU second of the GIL each). The threads are the slot's own pool
        (:meth:`ValidationSlot.executor`: paused validations hold theirs).

        With ``bucket`` (a tenant's CPU bucket, ``edge_server.profile_budget.TenantBucket``): admitted before
        waiting for the slot and again once it holds it (the calls queued behind the slot were admitted while the
        bucket still held CPU time), the thread's CPU time charged to it, and ``check`` raises once it is spent
        (``CpuMeter.check``: ``fn`` passes it to ``compile_slice``, which stops mid-way); the turns are the
        bucket's tenant's. Without, the turns are one anonymous tenant's.

        ``hold_bytes``: host memory the validation holds while it is in progress (its parsed spec and meta values:
        ``VALIDATION_BYTES_PER_SPEC_BYTE`` per spec byte, ``edge_server.session``), reserved for ``holder`` in the
        memory budget when it starts (it holds the slot) until it ends. A paused validation keeps its reservation,
        so the validations in progress at once are bounded by the budget too, not by ``max_paused`` alone (review19
        F4: 17 tenants' 6.45 MiB specs in progress at once, +1629 MiB of RSS beside a budget that saw 103 MiB).
        One whose reservation does not fit is refused RESOURCE_EXHAUSTED (``MemoryBudget.reserve``, naming
        ``what``) before it validates anything; it gives the slot up to the next turn.

        Raises what ``fn`` raises, ``ResourceExhausted`` (its working memory) and ``ProfileBudgetExceeded``
        (RESOURCE_EXHAUSTED)."""
        from edge_server.profile_budget import CpuMeter

        slots = self.compile_slots
        turn = bucket.tenant if bucket is not None else ""

        def job() -> T:
            hold = None
            try:
                if hold_bytes > 0:
                    hold = self.memory.reserve(holder, hold_bytes, what)
                if bucket is None:
                    return fn(lambda: slots.yield_point(turn))
                bucket.admit()
                with CpuMeter(bucket.budget, bucket.tenant) as meter:
                    def check() -> None:
                        meter.check()
                        slots.yield_point(turn)

                    return fn(check)
            except BaseException as e:
                # raised from inside the validation (its budget's check, a bad op): the traceback's frames hold the
                # parsed spec and its meta values in reference cycles (~456k objects, ~80 MiB for a 6.45 MiB spec),
                # which only a full collection frees; dropped here, they are freed now
                e.__traceback__ = None
                raise
            finally:
                if hold is not None:
                    hold.release()
                    self.trimmer.note(hold_bytes)
                slots.release()

        if bucket is not None:
            bucket.admit()
        await slots.acquire(turn, holder, hold_bytes)
        loop = asyncio.get_running_loop()
        try:
            fut = loop.run_in_executor(slots.executor(), job)
        except BaseException:
            slots.release()
            raise
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: the caller may have gone
        return await asyncio.shield(fut)

    def count_stopped(self, late_ops: int) -> None:
        with self._lock:
            self.ops_after_cancel += late_ops
            self.stopped_runs += 1
