"""The server's counters as a caller may read them: Stats (a tenant's own view, or an operator's of the whole
server) and the per-tenant and server-wide values of ``/metrics`` (:class:`edge_server.metrics.RuntimeCollector`).

Reads only: every counter is owned by the part that counts it (sessions, weight store, scheduler, profile cache and
budget, memory budget, validation slot, call gate); :class:`StatsReader` holds references to them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge_server.auth import Authenticator, Principal, view_of
from edge_server.calls import CallGate
from edge_server.errors import PermissionDenied
from edge_server.health_admission import HealthAdmission
from edge_server.memory import Bounds, MemoryBudget
from edge_server.metrics import by_tenant
from edge_server.profile_budget import ProfileBudget
from edge_server.profiling import ProfileCache
from edge_server.scheduler import ComputeScheduler, SchedulerStats
from edge_server.session_manager import SessionManager
from edge_server.weight_store import StoreStats, WeightStore


@dataclass(slots=True)
class SessionSnapshot:
    session_id: str
    tenant: str
    model_id: str
    share: float
    requests_done: int
    requests_failed: int
    weights_pinned: int
    bytes_received: int
    chunks_dropped: int = 0
    slices_rejected: int = 0


@dataclass(slots=True)
class ServerStats:
    """vLLM-style stats snapshot."""

    store: StoreStats
    scheduler: SchedulerStats
    active_sessions: int
    sessions_opened: int
    requests_done: int
    requests_failed: int
    profile_cache_hits: int
    profile_cache_misses: int
    uptime_s: float
    session: SessionSnapshot | None = None
    tenant_bytes: int = 0
    chunks_dropped: int = 0
    slices_rejected: int = 0


class StatsReader:
    """Reads the server's counters: :meth:`stats` for the Stats call, scoped to what its caller may see, and
    :meth:`metrics_snapshot` for ``/metrics`` (event loop)."""

    def __init__(self, auth: Authenticator | None, sessions: SessionManager, store: WeightStore,
                 scheduler: ComputeScheduler, profiles: ProfileCache, profile_budget: ProfileBudget,
                 memory: MemoryBudget, bounds: Bounds, calls: CallGate | None,
                 health: HealthAdmission | None = None) -> None:
        """``auth`` None: no authentication (every caller sees the whole server); ``calls`` None: no call gate;
        ``health``: the health service's admission (its budget and pacing in ``/metrics``), None: not counted."""
        self.auth = auth
        self.sessions = sessions
        self.store = store
        self.scheduler = scheduler
        self.profiles = profiles
        self.profile_budget = profile_budget
        self.memory = memory
        self.bounds = bounds
        self.calls = calls
        self.health = health
        self.started = time.monotonic()
        """When the server started (``time.monotonic``; Stats' ``uptime_s`` counts from it)."""

    def stats(self, who: Principal | None = None, session_id: str = "", tenant: str = "") -> ServerStats:
        """Server counters. With authentication a tenant sees only its own sessions and weights (another tenant
        named: PermissionDenied; another tenant's session: NotFound, as an unknown id); an operator token sees
        everything."""
        who = who or Principal("", operator=True)  # an in-process caller (tests, tools)
        if self.auth is not None and not who.operator and tenant and tenant != who.tenant:
            raise PermissionDenied("only an operator token may read another tenant's stats")
        snap = None
        if session_id:  # another tenant's session is one that does not exist (break31 F5)
            s = self.sessions.get_for_tenant(session_id, view_of(self.auth, who))
            sc = s.counters
            snap = SessionSnapshot(
                s.session_id,
                s.tenant,
                s.model_id,
                self.scheduler.share(s.session_id),
                sc.requests_done,
                sc.requests_failed,
                len(s.available),
                sc.bytes_received,
                sc.chunks_dropped,
                sc.slices_rejected,
            )
        own = view_of(self.auth, who)  # a tenant's own view; None: the whole server
        c = self.sessions.totals(own)
        if own is not None:  # its own profile cache counters (its group's: they share the entries)
            cache_hits, cache_misses = self.profiles.hits_of(self.auth.domain_of(own))
        else:
            cache_hits, cache_misses = self.profiles.hits, self.profiles.misses
        return ServerStats(
            store=self.store.stats(own),
            scheduler=self.scheduler.stats(),
            active_sessions=len(self.sessions.visible(own)),
            sessions_opened=self.sessions.opened(own),
            requests_done=c.requests_done,
            requests_failed=c.requests_failed,
            profile_cache_hits=cache_hits,
            profile_cache_misses=cache_misses,
            uptime_s=time.monotonic() - self.started,
            session=snap,
            tenant_bytes=self.store.tenant_bytes(tenant or (own or "")) if (tenant or own) else 0,
            chunks_dropped=c.chunks_dropped,
            slices_rejected=c.slices_rejected,
        )

    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        """Per-tenant values of :class:`edge_server.metrics.RuntimeCollector`'s series, and the server-wide ones
        under ``"server"`` (event loop)."""
        out: dict[str, dict[str, float]] = {}
        open_by: dict[str, int] = {}
        for s in self.sessions.sessions.values():
            open_by[s.tenant] = open_by.get(s.tenant, 0) + 1
        budget = self.profile_budget
        for t in self.sessions.tenants() | self.store.tenants() | set(budget.charged_s) | set(budget.refused_by):
            c = self.sessions.totals(t)
            st = self.store.stats(t)
            values = {
                "requests_done": c.requests_done,
                "requests_failed": c.requests_failed,
                "bytes_received": c.bytes_received,
                "sessions_opened": self.sessions.opened(t),
                "cache_commits": st.commits,
                "cache_evictions": st.evictions,
                "uploads_rejected": st.rejected,
                "sessions_open": open_by.get(t, 0),
                "cache_bytes": st.bytes_used,
                "cache_entries": st.entries,
                "pinned_bytes": st.pinned_bytes,
                "staging_bytes": st.staging_bytes,
                "profile_cpu_seconds": budget.charged_s.get(t, 0.0),
                "profile_refused": budget.refused_by.get(t, 0),
            }
            for k, v in values.items():
                out.setdefault(k, {})[t] = float(v)
        for k in list(out):  # a caller names its tenant without --auth-tokens: labels bounded (review21b finding 7)
            out[k] = by_tenant(out[k])
        # what bounds strangers (session 21): the budget's holders, the gate's calls and reading slots, the
        # validation slot (edge_server.metrics.RuntimeCollector's SERVER_* series and the per-tenant ones below)
        mem = self.memory.stats()
        running, paused, waiting = self.bounds.compile_slots.counts()
        server = {"memory_budget_bytes": mem.limit_bytes, "memory_reserved_total_bytes": mem.reserved_bytes,
                  "memory_refused": mem.refused, "validations_running": running, "validations_paused": paused,
                  "validations_waiting": waiting, "staging_area_bytes": self.store.staging.used,
                  "staging_area_capacity_bytes": self.store.staging.capacity}
        out["memory_reserved_bytes"] = by_tenant(self.memory.holders())
        gate = self.calls
        if gate is not None:
            out["calls_open"] = by_tenant(gate.open_by_key())
            out["reading_slots_held"] = by_tenant(gate.reading_held())
            out["reading_calls_waiting"] = by_tenant(gate.reading_queued())
            server.update(reading_slots=gate.server_reading, reading_slots_free=gate.server_free,
                          reading_slots_taken_back=gate.taken_back, reading_slot_timeouts=gate.slot_timeouts,
                          first_message_ended=gate.evicted, request_holds_refused=gate.hold_refused)
        health = self.health
        if health is not None:
            server.update(health_budget_bytes=health.budget_bytes, health_reserved_bytes=health.held(),
                          health_calls_paced=health.pacing.delayed if health.pacing is not None else 0)
        out["server"] = {k: float(v) for k, v in server.items()}
        return out
