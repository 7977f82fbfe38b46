"""How much of ARA's planner CPU each identity and the whole server may still spend (token buckets).

Every ARA re-plan (a join, profile update or claim correction re-plans every profiled session) costs CPU,
in the planner child since session 13 (``edge_server.plan_process``). Since session 34 it is split: each
session's own subproblems (its plans at the shares tried, ``partitioner.allocation.SubproblemCache``,
memoized across re-plans) are charged to that session's identity (``SessionInfo.planner_key``: the
token's tenant with ``--auth-tokens``, else the gRPC peer), the rest (the joint share allocation) to the
identity whose session caused the re-plan. An identity has two buckets: its own, charged for the re-plans
it caused (its sessions' subproblems in them and the joint step), and a passive one, charged for its
sessions' subproblems in re-plans other identities caused. A join or update waits while its own bucket
or the global one is in debt; an identity whose passive bucket is in debt has its sessions' splits kept
(not re-solved) in other identities' re-plans, so neither its large idle graph nor another's churn makes
anybody else pay or wait. Every re-plan's whole CPU also goes to one global bucket of all sessions
(``GLOBAL_KEY``): a client can open connections for free, so the per-identity buckets alone bound nothing
(README, Security model).
"""

from __future__ import annotations

import threading
import time

__all__ = [
    "GLOBAL_KEY",
    "PLAN_CPU_BURST_S",
    "PLAN_CPU_GLOBAL_BURST_S",
    "PLAN_CPU_GLOBAL_SHARE",
    "PLAN_CPU_SHARE",
    "PASSIVE_DEBT_S",
    "PlannerBudgets",
]

PLAN_CPU_SHARE = 0.05
"""CPU seconds per second a tenant's sessions may make ARA's planner spend in the long run (their joins,
profile updates and claim corrections each re-plan every profiled session): a token bucket of planner
CPU per identity, charged after each re-plan with the planner's CPU time (the planner thread's and the
planner child's). An identity in debt has its next join or profile update planned only when the bucket is
back at 0, likewise its next claim correction (updates waiting meanwhile are coalesced, the latest wins;
the session keeps its shares until then). Before, three sessions re-sending 10k-op graphs kept the planner
busy back to back, its GIL beside every session's work: a victim's ~1 ms request took 789 ms median
(bench/bench_profile_flood.py --allocator ara)."""
PLAN_CPU_BURST_S = 2.0
"""Planner CPU seconds an identity may spend at once (the bucket's size): an honest UE's join and its few
updates (re-plans of ~0.1 CPU s per 1000 ops per profiled session) never wait."""
PLAN_CPU_GLOBAL_SHARE = 0.5
"""CPU seconds per second all sessions together may make ARA's planner spend in the long run (a bucket
beside each identity's, ``GLOBAL_KEY``): without ``--auth-tokens`` an identity is a connection, which a
client makes for free, so the per-identity buckets alone bound nothing. While the global bucket is in debt
every join and update waits (each keeps its shares until then)."""
PLAN_CPU_GLOBAL_BURST_S = 20.0
"""Size of the global planner bucket (CPU s): honest joins of several UEs at once (each re-plan plans
every profiled UE: ~1 CPU s each for captured models beside one other UE) do not wait."""
PASSIVE_DEBT_S = 20.0
"""A passive bucket's debt is floored at max(burst, this x share) CPU s: an identity whose sessions' splits
are kept because of it has them re-solved again within ~2 x that / share seconds (40 s with the defaults)
of other identities' re-plans (its own re-plans re-solve them at once)."""
GLOBAL_KEY = "\x00all"
"""The global planner bucket's key (no tenant name or peer address holds a NUL)."""


class PlannerBudgets:
    """Planner CPU buckets: one per identity (``share`` CPU s per s, ``burst`` CPU s) and one global
    (``global_share``, ``global_burst``; key ``GLOBAL_KEY``). A share of 0 turns that kind of bucket off.
    Thread-safe. Raises ValueError for a negative share or burst."""

    def __init__(self, share: float = PLAN_CPU_SHARE, burst: float = PLAN_CPU_BURST_S,
                 global_share: float = PLAN_CPU_GLOBAL_SHARE, global_burst: float = PLAN_CPU_GLOBAL_BURST_S) -> None:
        if min(share, burst, global_share, global_burst) < 0:
            raise ValueError("planner CPU shares and bursts must be >= 0")
        self.share, self.burst = float(share), float(burst)
        self.global_share, self.global_burst = float(global_share), float(global_burst)
        self._lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}
        """Key -> [planner CPU seconds it may still spend (negative: its debt), time of that value]."""
        self._passive: dict[str, list[float]] = {}
        """Identity -> its passive bucket (its sessions' subproblems in re-plans others caused), likewise;
        its debt is floored (``_passive_floor``): a kept split is re-solved within a bounded time."""
        self.cpu_s: dict[str, float] = {}
        """Identity -> planner CPU seconds charged to its own bucket since start: the re-plans its sessions
        caused (their own subproblems and the joint step)."""
        self.passive_cpu_s: dict[str, float] = {}
        """Identity -> planner CPU seconds its sessions' subproblems took in re-plans other identities
        caused, since start (its passive bucket)."""

    def _limits(self, key: str) -> tuple[float, float]:
        return (self.global_share, self.global_burst) if key == GLOBAL_KEY else (self.share, self.burst)

    def _bucket(self, key: str, now: float, store: dict[str, list[float]] | None = None) -> list[float]:
        share, burst = self._limits(key)
        store = self._buckets if store is None else store
        b = store.get(key)
        if b is None:
            b = store[key] = [burst, now]
        else:
            b[0] = min(burst, b[0] + (now - b[1]) * share)
            b[1] = now
        return b

    def _passive_floor(self) -> float:
        """The deepest debt of a passive bucket (CPU s): the burst, at least ``PASSIVE_DEBT_S`` x share."""
        return max(self.burst, PASSIVE_DEBT_S * self.share)

    def passive_tokens(self, key: str) -> float:
        """CPU seconds identity ``key``'s passive bucket holds now (negative: in debt; the burst if never
        charged)."""
        with self._lock:
            return self._bucket(key, time.monotonic(), self._passive)[0]

    def passive_debt(self, key: str | None) -> bool:
        """Whether identity ``key``'s passive bucket is in debt (its sessions' splits are then kept in
        re-plans other identities cause). False for ``None`` or with the per-identity share 0 (off)."""
        if key is None or self.share <= 0:
            return False
        return self.passive_tokens(key) < 0

    def tokens(self, key: str) -> float:
        """CPU seconds ``key``'s bucket holds now (negative: its debt; the burst for a key never charged)."""
        with self._lock:
            return self._bucket(key, time.monotonic())[0]

    def wait_s(self, key: str | None) -> float:
        """Seconds until identity ``key`` and the server (``GLOBAL_KEY``) may have another re-plan (0: now;
        0 for ``None``, an identity not known)."""
        if key is None:
            return 0.0
        with self._lock:
            now, wait = time.monotonic(), 0.0
            for k in (key, GLOBAL_KEY):
                share = self._limits(k)[0]
                if share > 0:
                    tokens = self._bucket(k, now)[0]
                    if tokens < 0:
                        wait = max(wait, -tokens / share)
            return wait

    def charge(self, key: str, cpu_s: float, live: set[str] | frozenset[str] = frozenset(),
               others: dict[str, float] | None = None) -> None:
        """A re-plan identity ``key`` caused: ``cpu_s`` planner CPU seconds to ``key``'s own bucket (its
        sessions' subproblems and the joint step), ``others[k]`` CPU seconds (identity k's sessions'
        subproblems, k != key) to k's passive bucket; all of it to the global bucket. Buckets of identities
        not in ``live`` (no open session) and full again are forgotten once there are many, and so are their
        totals in ``cpu_s`` / ``passive_cpu_s`` (without ``--auth-tokens`` an identity is a connection)."""
        others = {k: v for k, v in (others or {}).items() if k != key and v > 0}
        with self._lock:
            self.cpu_s[key] = self.cpu_s.get(key, 0.0) + cpu_s
            now = time.monotonic()
            for k in (key, GLOBAL_KEY):
                if self._limits(k)[0] > 0:
                    self._bucket(k, now)[0] -= cpu_s + (sum(others.values()) if k == GLOBAL_KEY else 0.0)
            for k, v in others.items():
                self.passive_cpu_s[k] = self.passive_cpu_s.get(k, 0.0) + v
                if self.share > 0:
                    b = self._bucket(k, now, self._passive)
                    b[0] = max(-self._passive_floor(), b[0] - v)
            for store in (self._buckets, self._passive):
                if len(store) > 4 * len(live) + 64:
                    for k in [k for k in store
                              if k not in live and k != GLOBAL_KEY and self._bucket(k, now, store)[0] >= self.burst]:
                        del store[k]
            for totals in (self.cpu_s, self.passive_cpu_s):  # (review34: one entry per connection ever charged)
                if len(totals) > 4 * len(live) + 64:
                    for k in [k for k in totals if k not in live and k not in self._buckets and k not in self._passive]:
                        del totals[k]
