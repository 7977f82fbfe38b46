"""Per-tenant budget of ProfileGraph CPU time: a token bucket of CPU seconds per tenant.

ProfileGraph asks the server to validate a stranger's slice (pure-Python work that holds the GIL) and
to run it on random data; abandoned or not, that work is taken from every other tenant's requests (the
event loop, the compute worker and the cores). Each tenant has a bucket of ``capacity_s`` CPU seconds
that refills at ``rate`` CPU seconds per second (a fraction of one CPU); the work a ProfileGraph costs
(the validating thread's CPU time, each profile step's CPU time on its compute worker and that
worker's intra-op threads, ``edge_server.thread_cpu``; abandoned work too, since it is measured where it
runs) is charged to the caller's bucket. A call is refused RESOURCE_EXHAUSTED before its spec is
decoded while the bucket is empty, and a running profile stops at its next step once the bucket is
spent. It is the classic token bucket (Turner, "New directions in communications",
1986; the leaky-bucket policer of ATM traffic shaping), with CPU seconds as tokens: over a window of
``T`` seconds a tenant's ProfileGraph work takes at most ``capacity_s + rate * T`` CPU seconds plus one
validation and one step.

The same bucket bounds what DefineSlice (a session's slice, ``Session.define_slice``) may make the server spend on
validation: a second :class:`ProfileBudget` named "slice validation" (``ServerConfig.slice_cpu_s`` /
``slice_cpu_share``, quota ``slice_cpu_s`` / ``slice_cpu_share``), charged with the validating thread's CPU, and
:meth:`CpuMeter.check` stops a validation mid-way once the bucket is spent (a slice of 100k ops whose meta-kernel
calls all differ was ~50-140 s of CPU in one call; review17 F5).

Thread-safe: charges come from the validating thread and the compute workers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_server.errors import FailedPrecondition, ResourceExhausted
from edge_server.thread_cpu import ThreadCpu

if TYPE_CHECKING:
    from edge_server.auth import Authenticator
    from edge_server.config import ServerConfig

logger = logging.getLogger(__name__)

ANONYMOUS = "__profile__"
"""Bucket of ProfileGraph callers without a tenant (a server without ``--auth-tokens``): they share one."""
ANONYMOUS_SLICES = "__slices__"
"""Bucket of the slice validations of sessions without a tenant's token (a server without ``--auth-tokens``,
where the tenant is only the label a session names): they share one."""


class ProfileBudgetExceeded(ResourceExhausted):
    """The tenant's ProfileGraph CPU budget is spent (RESOURCE_EXHAUSTED); ``retry_after_s`` is when
    the bucket holds CPU time again at its refill rate."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetTooSmall(FailedPrecondition):
    """One piece of work (a slice's validation) spent more CPU than the tenant's whole bucket holds and was not
    done: it can never pass under this budget, whatever the wait (FAILED_PRECONDITION, permanent: a retry time
    would send the client back for ever, review18 F11; the caller needs a smaller slice or a larger quota)."""


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """One tenant's bucket: ``capacity_s`` CPU seconds (0: no budget, unlimited), refilled at ``rate``
    CPU seconds per second (0 < rate; e.g. 0.1 = a tenth of one CPU on average)."""

    capacity_s: float
    rate: float

    @property
    def unlimited(self) -> bool:
        return self.capacity_s <= 0


class QuotaLimits:
    """A budget's limits per bucket (``ProfileBudget``'s ``limits_of``): the tenant's quota keys ``cap_key`` /
    ``rate_key`` where its tokens file entry sets them, else the server's defaults, the ``ServerConfig`` fields of
    the same names (e.g. ``profile_cpu_s`` / ``profile_cpu_share``: ``--profile-cpu-s`` / ``--profile-cpu-share``).
    The shared bucket ``anonymous``, and every bucket without authentication (``auth`` None), get the defaults.
    Read at every call, so a reloaded tokens file applies at once."""

    def __init__(self, config: ServerConfig, auth: Authenticator | None, anonymous: str, cap_key: str,
                 rate_key: str) -> None:
        self.config = config
        self.auth = auth
        self.anonymous = anonymous
        self.cap_key = cap_key
        self.rate_key = rate_key

    def __call__(self, bucket: str) -> BudgetLimits:
        cap, rate = getattr(self.config, self.cap_key), getattr(self.config, self.rate_key)
        if self.auth is not None and bucket != self.anonymous:
            q = self.auth.quota_of(bucket)
            cap = cap if getattr(q, self.cap_key) is None else getattr(q, self.cap_key)
            rate = rate if getattr(q, self.rate_key) is None else getattr(q, self.rate_key)
        return BudgetLimits(cap, rate)


@dataclass(slots=True)
class _Bucket:
    balance: float
    stamp: float
    capacity_s: float


class ProfileBudget:
    """Token buckets of CPU seconds by tenant (see the module docstring).

    ``limits_of(tenant)`` gives a tenant's :class:`BudgetLimits` (read at every call, so a reloaded
    tokens file applies at once); ``clock`` is monotonic seconds (tests pass a fake one).
    """

    def __init__(self, limits_of: Callable[[str], BudgetLimits], clock: Callable[[], float] = time.monotonic, *,
                 name: str = "ProfileGraph", quota_keys: str = "profile_cpu_s / profile_cpu_share") -> None:
        self.name = name
        """What the budget pays for, in its errors ("ProfileGraph", "slice validation")."""
        self.quota_keys = quota_keys
        """The tokens file's quota keys of its limits, in its errors."""
        self._limits_of = limits_of
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self.refused_by: dict[str, int] = {}
        """Calls refused at admission per tenant (bucket name)."""
        self.stopped = 0
        """Profiles stopped while running (bucket spent)."""
        self.charged_s: dict[str, float] = {}
        """CPU seconds charged per tenant since start."""

    @property
    def refused(self) -> int:
        """Calls refused at admission (bucket empty), all tenants together (the sum of ``refused_by``)."""
        with self._lock:
            return sum(self.refused_by.values())

    def bucket(self, tenant: str) -> TenantBucket:
        """``tenant``'s bucket as one object (what work done elsewhere, e.g. in a profiling child, is
        admitted by, charged to and stopped by)."""
        return TenantBucket(self, tenant)

    def _refilled(self, tenant: str, lim: BudgetLimits) -> _Bucket:
        now = self._clock()
        b = self._buckets.get(tenant)
        if b is None:
            b = self._buckets[tenant] = _Bucket(lim.capacity_s, now, lim.capacity_s)
        else:
            b.balance = min(lim.capacity_s, b.balance + (now - b.stamp) * lim.rate)
            b.stamp = now
            b.capacity_s = lim.capacity_s
        return b

    def balance(self, tenant: str) -> float:
        """CPU seconds left in ``tenant``'s bucket now (negative: in debt; ``inf`` without a budget)."""
        lim = self._limits_of(tenant)
        if lim.unlimited:
            return float("inf")
        with self._lock:
            return self._refilled(tenant, lim).balance

    def _shown(self, tenant: str) -> str:
        return f"anonymous {self.name} callers" if tenant in (ANONYMOUS, ANONYMOUS_SLICES) else f"tenant {tenant!r}"

    def _exceeded(self, tenant: str, lim: BudgetLimits, balance: float, what: str,
                  need_s: float = 0.0) -> ProfileBudgetExceeded:
        """The error of a spent bucket; its retry time is when the bucket holds ``need_s`` CPU seconds again (at
        least what a stopped piece of work already took: sent back when the bucket is merely positive, it was
        stopped again at once, as often as the refill allowed)."""
        retry = (max(0.0, need_s - balance) + 1e-3) / lim.rate
        return ProfileBudgetExceeded(
            f"{what}: the {self.name} CPU budget of {self._shown(tenant)} is spent ({lim.capacity_s:g} CPU s, "
            f"refilled at {lim.rate:g} CPU s per s; quota {self.quota_keys}): retry in {retry:.1f} s",
            retry,
        )

    def admit(self, tenant: str) -> None:
        """Raise :class:`ProfileBudgetExceeded` if ``tenant``'s bucket holds no CPU time (call before
        decoding anything of the request)."""
        lim = self._limits_of(tenant)
        if lim.unlimited:
            return
        with self._lock:
            balance = self._refilled(tenant, lim).balance
            if balance > 0:
                return
            self.refused_by[tenant] = self.refused_by.get(tenant, 0) + 1
        raise self._exceeded(tenant, lim, balance, f"{self.name} refused")

    def charge(self, tenant: str, cpu_s: float) -> None:
        """Take ``cpu_s`` CPU seconds of work done for ``tenant`` out of its bucket (it may go negative:
        the debt is repaid at the refill rate before the next call is admitted)."""
        with self._lock:
            self.charged_s[tenant] = self.charged_s.get(tenant, 0.0) + cpu_s
            lim = self._limits_of(tenant)
            if lim.unlimited:
                return
            self._refilled(tenant, lim).balance -= cpu_s

    def check(self, tenant: str, pending_s: float = 0.0, work_s: float | None = None) -> None:
        """Between two steps of a running profile (or within a validation): raise :class:`ProfileBudgetExceeded`
        once ``tenant``'s bucket is spent (balance below zero), counting ``pending_s`` CPU seconds spent and not
        charged yet; :class:`BudgetTooSmall` (permanent) instead when the work in progress alone took more than the
        bucket's whole capacity: no wait would let it pass.

        ``work_s``: the CPU seconds the work in progress (one validation) has taken since it began, charged or not
        (default ``pending_s``: none of it charged yet, as ``CpuMeter.check``). A caller that charges the work in
        pieces as it runs (a profiling child, ``edge_server.sandbox``) passes ``pending_s`` 0 and the whole so far
        here: the test for :class:`BudgetTooSmall` and the retry time (when the bucket holds ``work_s`` again) are
        then the in-process ones (review19 F5: with the pieces already charged, it answered "retry in 0.1 s" for
        ever to a validation bigger than the whole bucket)."""
        lim = self._limits_of(tenant)
        if lim.unlimited:
            return
        work = pending_s if work_s is None else work_s
        with self._lock:
            balance = self._refilled(tenant, lim).balance - pending_s
            if balance >= 0:
                return
            self.stopped += 1
        if work > lim.capacity_s:
            raise BudgetTooSmall(
                f"{self.name} stopped: it took {work:.3g} CPU s and was not done, more than the whole "
                f"{self.name} CPU budget of {self._shown(tenant)} ({lim.capacity_s:g} CPU s; quota "
                f"{self.quota_keys}): it can never pass under this budget (a smaller slice, or a larger quota)"
            )
        raise self._exceeded(tenant, lim, balance, f"{self.name} stopped", need_s=work)


@dataclass(frozen=True, slots=True)
class TenantBucket:
    """One tenant's bucket of a :class:`ProfileBudget`: :meth:`admit` before work starts, :meth:`charge`
    CPU seconds as they are spent, :meth:`check` between steps (raises once the bucket is spent)."""

    budget: ProfileBudget
    tenant: str

    def admit(self) -> None:
        self.budget.admit(self.tenant)

    def charge(self, cpu_s: float) -> None:
        self.budget.charge(self.tenant, cpu_s)

    def check(self, work_s: float | None = None) -> None:
        """:meth:`ProfileBudget.check` with nothing pending (all charged); ``work_s``: the work in progress's CPU
        seconds so far, charged in pieces (its :class:`BudgetTooSmall` test and retry time)."""
        self.budget.check(self.tenant, 0.0, work_s)


class CpuMeter:
    """CPU seconds of the calling thread and of its intra-op (OpenMP) team over a block
    (``edge_server.thread_cpu.ThreadCpu``; a thread ``time.thread_time`` alone missed the team's share of
    every op that parallelizes), charged to a budget on exit, also when the block raises::

        with CpuMeter(budget, tenant):
            validate()
    """

    __slots__ = ("_budget", "_meter", "_t0", "_tenant")

    def __init__(self, budget: ProfileBudget, tenant: str) -> None:
        self._budget = budget
        self._tenant = tenant
        self._meter = ThreadCpu()
        self._t0 = 0.0

    def __enter__(self) -> CpuMeter:
        self._meter.__enter__()
        self._t0 = time.thread_time()
        return self

    def check(self) -> None:
        """Inside the block: raise :class:`ProfileBudgetExceeded` once the budget, less the calling thread's CPU
        time since the block began (not charged yet), is spent. Only the calling thread is read (a validation's
        torch work is on meta tensors: no intra-op team); ~1 us."""
        self._budget.check(self._tenant, time.thread_time() - self._t0)

    def __exit__(self, *exc: object) -> None:
        self._meter.__exit__(*exc)
        self._budget.charge(self._tenant, self._meter.cpu_s)
