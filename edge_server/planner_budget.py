"""How much of ARA's planner CPU each identity and the whole server may still spend (token buckets).

Every ARA re-plan (a join, profile update or claim correction re-plans every profiled session) costs CPU,
in the planner child since session 13 (``edge_server.plan_process``). It is charged to the identity
whose session caused it (``SessionInfo.planner_key``: the token's tenant with ``--auth-tokens``, else the
gRPC peer) and to one global bucket of all sessions (``GLOBAL_KEY``): a client can open connections for
free, so the per-identity buckets alone bound nothing. A join or update waits while either bucket is in
debt (README, Security model).
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
        self.cpu_s: dict[str, float] = {}
        """Identity -> planner CPU seconds its sessions' re-plans took since start."""

    def _limits(self, key: str) -> tuple[float, float]:
        return (self.global_share, self.global_burst) if key == GLOBAL_KEY else (self.share, self.burst)

    def _bucket(self, key: str, now: float) -> list[float]:
        share, burst = self._limits(key)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = [burst, now]
        else:
            b[0] = min(burst, b[0] + (now - b[1]) * share)
            b[1] = now
        return b

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

    def charge(self, key: str, cpu_s: float, live: set[str] | frozenset[str] = frozenset()) -> None:
        """A re-plan identity ``key`` caused took ``cpu_s`` planner CPU seconds. Buckets of identities not
        in ``live`` (no open session) and full again are forgotten once there are many."""
        with self._lock:
            self.cpu_s[key] = self.cpu_s.get(key, 0.0) + cpu_s
            now = time.monotonic()
            for k in (key, GLOBAL_KEY):
                if self._limits(k)[0] > 0:
                    self._bucket(k, now)[0] -= cpu_s
            if len(self._buckets) > 4 * len(live) + 64:
                for k in [k for k in self._buckets
                          if k not in live and k != GLOBAL_KEY and self._bucket(k, now)[0] >= self.burst]:
                    del self._buckets[k]
