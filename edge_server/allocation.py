"""How the server's compute is shared among sessions: the hook the partitioner's ARA plugs into.

The server calls the allocator when a session joins, leaves, or finishes uploading its weights; the
allocator returns the new share of every open session (weights of a weighted fair queue, summing to at
most 1). The compute scheduler serves sessions in proportion to these shares. The default gives every
open session an equal share; ARA (MJOA-MU) gives phi_n proportional to sqrt(w_n C_n).

Uplink shares (``uplink_shares``): the fraction beta_n of the cell's uplink each session should use
(summing to at most 1). The server cannot shape the radio link; it tells each UE its beta_n
(``SessionOpened.uplink_share``, ``ShareChanged.uplink_share``) and the UE paces its uplink to
beta_n x the cell rate (``ue_client.session.UplinkQueue``).

Per tenant first, then per session (``tenant_split``): the cell is a tenant's, not a session's, so a
tenant with k sessions does not get k shares. Tenant t's part is ``tenant_weight_t / sum over tenants
with open sessions`` (the quota's ``compute_weight``, the same weight the compute scheduler's first level
uses; 1 each without authentication), split equally among its sessions (equal) or, under ARA, a tenant's
sessions together weigh at most ``tenant_weight_t`` in ARA's weighted latency sum (``ara_weights``).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from edge_server.claims import CLAIM_SLACK, ClaimChecks, calibrate_server_costs
from edge_server.memory import Reservation
from edge_server.plan_process import PLAN_CPU_BUDGET_S, PLAN_DEADLINE_S, PLAN_NICE, ChildPlanner
from edge_server.planner_budget import (
    GLOBAL_KEY,
    PLAN_CPU_BURST_S,
    PLAN_CPU_GLOBAL_BURST_S,
    PLAN_CPU_GLOBAL_SHARE,
    PLAN_CPU_SHARE,
    PlannerBudgets,
)
from partitioner.allocation import PLAN_SIZE, TOTAL_PLAN_SIZE, UPLINK_FLOOR, bounded_graph
from partitioner.state import ServerState
from protos.values import OpTime, UeProfile

logger = logging.getLogger(__name__)

__all__ = [
    "CLAIM_SLACK",
    "GLOBAL_KEY",
    "MAX_COST_GRAPH_OPS",
    "PLAN_CPU_BURST_S",
    "PLAN_CPU_GLOBAL_BURST_S",
    "PLAN_CPU_GLOBAL_SHARE",
    "PLAN_CPU_SHARE",
    "UPLINK_FLOOR",
    "AraShareAllocator",
    "EqualShareAllocator",
    "SessionInfo",
    "ShareAllocator",
    "PlanQueue",
    "ara_weights",
    "calibrate_server_costs",
    "split_by_tenant",
    "tenant_split",
]

MAX_COST_GRAPH_OPS = 10_000
"""Most ops a UE's cost graph (``UeProfile.cost_graph_json``) may have to be planned by ARA: every re-plan
plans every profiled session (~0.1 CPU s per 1000 ops each), and an 8 MiB OpenSession carries ~40k ops.
The models this project captures have at most a few thousand (bench_partitioner's largest: 2000)."""


def unparsed(profile: UeProfile) -> UeProfile:
    """``profile`` without its parsed cost graph (``UeProfile.cost_graph``), to keep with a session: the
    document is for the allocator's one parse into a ``CostGraph``; as Python objects it is up to ~24x
    its text (an 8 MiB OpenSession of ``{}`` ops: 185 MiB), outside ``--memory-mb``. A later profile
    update without a cost graph has the allocator parse the kept text (``AraShareAllocator._parse``)."""
    return profile if profile.cost_graph is None else dataclasses.replace(profile, cost_graph=None)


@dataclass(slots=True)
class SessionInfo:
    """What an allocator knows about a session."""

    session_id: str
    tenant: str
    model_id: str = ""
    weight: float = 1.0
    """Priority weight w_n (1.0 by default)."""
    server_ms: float = 0.0
    """Latest known server compute time of one request (C_n), 0 when unknown."""
    uploading: bool = True
    """True until the session's slice weights have all arrived."""
    tenant_weight: float = 1.0
    """The tenant's weight in sharing the server and the cell (its quota's ``compute_weight``; 1.0
    without authentication)."""
    planner_key: str = ""
    """Whose planner CPU bucket the session's re-plans are charged to (``AraShareAllocator``): with
    ``--auth-tokens`` ``tenant:NAME`` (the token's tenant), without it ``peer:ADDRESS`` (its gRPC
    connection: the tenant is then the client's word); "" means ``tenant``."""
    extra: dict = field(default_factory=dict)


def split_by_tenant(tenant_of: dict[str, tuple[str, float]], inner: dict[str, float] | None = None) -> dict[str, float]:
    """Shares summing to 1 over the sessions of ``tenant_of`` (``{session_id: (tenant, tenant weight)}``):
    tenant t gets ``weight_t / sum over tenants`` (each tenant counted once, with the weight of its first
    session; weights floored at 1e-9), split among its sessions in proportion to ``inner`` (equally when
    ``inner`` is None or gives the tenant's sessions 0 in all). Empty for no sessions. The one rule for
    both the compute shares (``SessionManager.tenant_shares``) and the uplink shares (``tenant_split``)."""
    by_tenant: dict[str, list[str]] = {}
    tw: dict[str, float] = {}
    for sid, (tenant, weight) in tenant_of.items():
        by_tenant.setdefault(tenant, []).append(sid)
        tw.setdefault(tenant, max(weight, 1e-9))
    total = sum(tw.values())
    out = {}
    for t, sids in by_tenant.items():
        part = tw[t] / total
        within = sum(inner[sid] for sid in sids) if inner is not None else 0.0
        for sid in sids:
            out[sid] = part * (inner[sid] / within if within > 0 else 1.0 / len(sids))
    return out


def tenant_split(sessions: dict[str, SessionInfo]) -> dict[str, float]:
    """Uplink shares per tenant (by ``tenant_weight``), then equal among the tenant's sessions
    (``split_by_tenant``)."""
    return split_by_tenant({sid: (info.tenant, info.tenant_weight) for sid, info in sessions.items()})


def ara_weights(sessions: dict[str, SessionInfo]) -> dict[str, float]:
    """ARA's weight w_n of each session: its (capped) claim, scaled so that one tenant's sessions weigh
    at most the tenant's weight together: w_n x min(1, tenant_weight_t / sum of its sessions' claims).
    One session per tenant keeps its claim."""
    claims: dict[str, float] = {}
    for info in sessions.values():
        claims[info.tenant] = claims.get(info.tenant, 0.0) + info.weight
    return {
        sid: info.weight * min(1.0, info.tenant_weight / claims[info.tenant])
        if claims[info.tenant] > 0
        else info.weight
        for sid, info in sessions.items()
    }


class ShareAllocator(ABC):
    """Interface: every callback returns ``{session_id: share}`` for all open sessions."""

    @abstractmethod
    def on_join(self, info: SessionInfo) -> dict[str, float]: ...

    @abstractmethod
    def on_leave(self, session_id: str) -> dict[str, float]: ...

    @abstractmethod
    def on_upload_done(self, session_id: str) -> dict[str, float]: ...

    @abstractmethod
    def preview_share(self, tenant: str) -> float:
        """The share a new session of ``tenant`` would get now (reported by Hello)."""

    def on_profile(self, session_id: str, profile: UeProfile, hold: Reservation | None = None) -> dict[str, float]:
        """The session's UE sent a new profile (``SessionRequest.profile``, already merged with the old
        one). ``hold``: the memory its parsed cost graph holds in the tenant's budget; the allocator owns it
        and releases it once it no longer keeps the graph waiting. Default: ignored (``hold`` released), the
        current shares."""
        if hold is not None:
            hold.release()
        return self.shares()

    def set_charge_listener(self, fn) -> None:
        """``fn(session_id, cpu_ms)`` is called with the CPU time the allocator spent on a session's behalf
        (ARA's re-plans), to be counted in that session's fair turn (``ComputeScheduler.charge``). Default:
        none is spent."""
        return None

    def on_measured(self, session_id: str, ops: Sequence[OpTime]) -> None:
        """The server ran a request of the session: ``ops`` are the times (``OpTime.name``, ``.ms``) of each
        op it ran, as measured by the server (``ServerTimings.ops``, passed as is: no copy per request).
        Called on the event loop: must not wait for a plan. Default: ignored."""
        return None

    def shares(self) -> dict[str, float]:
        """Current shares (default: recomputed by an upload-done on nobody)."""
        return {}

    def uplink_shares(self) -> dict[str, float]:
        """Current uplink shares ``{session_id: beta}`` in (0, 1], summing to at most 1; sessions not
        named get no uplink share (their UE sends at its link's rate). Default: none."""
        return {}

    def set_listener(self, fn) -> None:
        """``fn(shares)`` receives share tables computed after a callback returned (default: none are)."""
        return None

    def close(self) -> None:
        """The server is stopping: end what the allocator started (ARA's planner child). Default: nothing."""
        return None


class EqualShareAllocator(ShareAllocator):
    """Every open session gets 1/n."""

    def __init__(self) -> None:
        self._sessions: dict[str, SessionInfo] = {}
        self._lock = threading.Lock()

    def _equal(self) -> dict[str, float]:
        n = len(self._sessions)
        return {sid: 1.0 / n for sid in self._sessions} if n else {}

    def on_join(self, info: SessionInfo) -> dict[str, float]:
        with self._lock:
            self._sessions[info.session_id] = info
            return self._equal()

    def on_leave(self, session_id: str) -> dict[str, float]:
        with self._lock:
            self._sessions.pop(session_id, None)
            return self._equal()

    def on_upload_done(self, session_id: str) -> dict[str, float]:
        with self._lock:
            info = self._sessions.get(session_id)
            if info is not None:
                info.uploading = False
            return self._equal()

    def preview_share(self, tenant: str) -> float:
        with self._lock:
            return 1.0 / (len(self._sessions) + 1)

    def shares(self) -> dict[str, float]:
        with self._lock:
            return self._equal()

    def uplink_shares(self) -> dict[str, float]:
        """Equal per tenant (by tenant weight), then equal among the tenant's sessions (``tenant_split``):
        1/n for n sessions of n tenants."""
        with self._lock:
            return tenant_split(self._sessions)


class PlanQueue:
    """The planner thread and its queue: jobs run one at a time, in the order they are due, each after
    its delay (its identity's planner bucket in debt); ``background=False`` runs each job in the caller
    (tests, tools). ``run(job)`` is called on the planner thread."""

    def __init__(self, run, *, background: bool = True) -> None:
        self._run = run
        self.background = background
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._thread: threading.Thread | None = None
        self.deferred = 0
        """Jobs queued with a delay."""

    def submit(self, job, delay_s: float = 0.0) -> None:
        """Queue ``job``, after ``delay_s`` seconds."""
        if not self.background:
            self._run(job)
            return
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="coinfer-ara-planner", daemon=True)
                self._thread.start()
        if delay_s > 0:
            with self._lock:
                self.deferred += 1
            t = threading.Timer(delay_s, self._jobs.put, (job,))
            t.daemon = True
            t.start()
        else:
            self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                self._run(job)
            except Exception:  # a bug in one job must not end the planner thread
                logger.exception("ARA planner job %s failed", job[0])
            finally:
                with self._lock:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has run. True if idle."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)


class AraShareAllocator(ShareAllocator):
    """The server's ARA (MJOA-MU): which sessions ARA plans, with which claims, and the shares it published.

    Sessions that sent a :class:`protos.values.UeProfile` take part in ARA: their compute shares phi_n
    (proportional to sqrt(w_n C_n) for their current plans) split the part of the server that profiled
    sessions hold; sessions without a profile get an equal 1/n each. Its parts, one job each:

    * the partitioner's ``Allocator``: the UE problems ARA plans (graph, link, weight, what the server holds);
    * :class:`edge_server.plan_process.ChildPlanner`: runs each plan in a niced child process
      (``planner="child"``, the default; ``"inline"``: on the planner thread, as before session 13);
    * :class:`PlanQueue`: the planner thread; callbacks never wait for a plan;
    * :class:`edge_server.planner_budget.PlannerBudgets`: the planner CPU per identity and in all;
    * :class:`edge_server.claims.ClaimChecks`: claimed server costs against the server's measurements.

    The callbacks only update the session table under a short lock and return the shares known now (a new
    profiled session has an equal share until its plan is published). Each finished plan is published
    atomically and handed to the listener (:meth:`set_listener`). A plan that fails (bad client data, a
    planner error, a planner child that dies or runs past its deadline) publishes nothing: the shares
    published last stay in force; a session whose join or profile update failed leaves ARA's problems and
    holds the equal share 1/n until its next profile update.
    """

    def __init__(
        self,
        *,
        background: bool = True,
        plan_cpu_share: float = PLAN_CPU_SHARE,
        plan_cpu_burst_s: float = PLAN_CPU_BURST_S,
        plan_cpu_global_share: float = PLAN_CPU_GLOBAL_SHARE,
        plan_cpu_global_burst_s: float = PLAN_CPU_GLOBAL_BURST_S,
        plan_size: int = PLAN_SIZE,
        total_plan_size: int = TOTAL_PLAN_SIZE,
        planner: str = "child",
        plan_deadline_s: float = PLAN_DEADLINE_S,
        plan_cpu_budget_s: float = PLAN_CPU_BUDGET_S,
        plan_nice: int = PLAN_NICE,
        plan_idle: bool = False,
        plan_command: list[str] | None = None,
        **allocator_options,
    ) -> None:
        """``plan_cpu_share`` / ``plan_cpu_burst_s``: each identity's planner CPU bucket (refill in CPU s
        per s, size in CPU s; ``PLAN_CPU_SHARE``; an identity is ``SessionInfo.planner_key``); a share of 0
        turns the bucket off. ``plan_cpu_global_share`` / ``plan_cpu_global_burst_s``: the bucket of all
        sessions together (``PLAN_CPU_GLOBAL_SHARE``; 0 turns it off). ``plan_size`` /
        ``total_plan_size``: the largest size (ops + weights) of one session's graph and of all sessions'
        graphs that ARA plans as sent; a larger one is planned contracted or whole
        (``partitioner.allocation.bounded_graph``), decided before its plan starts. ``planner``: ``"child"``
        (ARA's search in a child process, ``edge_server.plan_process``; ``plan_deadline_s`` wall seconds a plan's
        child may go without progress, ``plan_cpu_budget_s`` its CPU seconds per plan, ``plan_nice`` added
        niceness, ``plan_idle`` SCHED_IDLE, ``plan_command`` the child's argv for tests) or ``"inline"`` (on
        the planner thread). ``allocator_options`` go to ``partitioner.allocation.Allocator`` (``policy``,
        ``max_rounds``, ...). Raises ValueError for a
        negative share or burst, or an unknown ``planner``."""
        from partitioner.allocation import Allocator

        if planner not in ("child", "inline"):
            raise ValueError(f"planner must be 'child' or 'inline', not {planner!r}")
        self.budgets = PlannerBudgets(plan_cpu_share, plan_cpu_burst_s, plan_cpu_global_share, plan_cpu_global_burst_s)
        self.claims = ClaimChecks()
        self.child: ChildPlanner | None = (
            ChildPlanner(deadline_s=plan_deadline_s, cpu_budget_s=plan_cpu_budget_s, nice=plan_nice, idle=plan_idle,
                         command=plan_command)
            if planner == "child" else None)
        self._ara = Allocator(planner=self.child, **allocator_options)
        me = weakref.ref(self)  # (no cycle: an allocator dropped is freed at once, and its planner child ends)
        self.queue = PlanQueue(lambda job: me()._run_job(job), background=background)
        self._plan_size = int(plan_size)
        self._total_plan_size = int(total_plan_size)
        self.bounded: dict[str, int] = {}
        """Plans of a graph over the bounds, by rule (``"contracted"``, ``"whole"``)."""
        self._queued_at: dict[str, float] = {}
        """Session id -> when its oldest join or profile update not yet planned was queued (monotonic s)."""
        self.plan_delays: dict[str, list[float]] = {}
        """Session id -> seconds from each of its joins / profile updates being queued to its plan being
        published (coalesced updates count from the first queued), until it leaves."""
        self._tenant_of: dict[str, str] = {}
        """Session id -> its identity (``SessionInfo.planner_key``, else its tenant), from its join until its
        leave is planned (whom a re-plan is charged to)."""
        self._holds: dict[str, Reservation] = {}
        """Session id -> the memory its queued profile update's cost graph holds in its tenant's budget."""
        self._charge_listener = None
        self._sessions: dict[str, SessionInfo] = {}
        self._in_ara: set[str] = set()
        self._uploaded: set[str] = set()
        """Sessions whose weights have all arrived (``on_upload_done``), until they leave."""
        self._phis: dict[str, float] = {}
        """The last published ARA compute shares (session id -> phi)."""
        self._betas: dict[str, float] = {}
        """The last published ARA uplink shares (session id -> beta)."""
        self._lock = threading.Lock()
        self._listener = None
        self._profile_queued: dict[str, UeProfile] = {}
        """Session id -> its latest profile update not yet planned (one queued job per session: a UE that
        sends updates faster than ARA plans them has them coalesced, the latest wins, parsed once)."""
        self.replans = 0
        """ARA re-plans run since start (joins, profile updates, leaves, upload completions, corrections)."""
        self.failed_plans = 0
        """Re-plans that failed (nothing published for them, unless the retry without the heaviest identity's
        sessions planned: ``dropped_heavy``)."""
        self.dropped_heavy = 0
        """Sessions taken out of ARA's problems because their identity's problems did most of the work of a
        re-plan, caused by another identity, that was stopped at its CPU budget (``_drop_heaviest``)."""
        self._job_work: dict[str, float] = {}
        self._job_clock: tuple[float, float] = (0.0, 0.0)
        """(planner thread CPU s, planner child CPU s) when the running job started."""
        self._stale_plans = 0

    @property
    def plan_cpu_s(self) -> dict[str, float]:
        """Identity -> planner CPU seconds charged to it for the re-plans its sessions caused (the planner
        thread's and the planner child's), since start: its sessions' own subproblems in them and the joint
        step, not other identities' subproblems (``passive_cpu_s``)."""
        return self.budgets.cpu_s

    @property
    def passive_cpu_s(self) -> dict[str, float]:
        """Identity -> planner CPU seconds its sessions' own subproblems took in re-plans other identities
        caused, since start (its passive bucket: in debt, its splits are kept, ``_frozen_for``)."""
        return self.budgets.passive_cpu_s

    @property
    def stale_plans(self) -> int:
        """Sessions' splits kept, not re-solved, in re-plans (their owner's passive bucket in debt)."""
        return self._stale_plans

    @property
    def deferred(self) -> int:
        """Joins and profile updates planned later because a planner bucket was in debt."""
        return self.queue.deferred

    @property
    def corrections(self) -> int:
        """Re-plans because a session's claimed server costs exceeded the server's measurements."""
        return self.claims.corrections

    def set_listener(self, fn) -> None:
        """``fn(shares)`` is called (on the planner thread) with every share table a finished plan gives. A
        server's session manager sets it at its first OpenSession (and closes the allocator at its stop): the
        planner child starts then, beside that session's opening. An allocator never attached to a server
        starts its child at its first plan, and ends it when collected or at exit."""
        self._listener = fn
        if self.child is not None and self.queue.background:
            threading.Thread(target=self.child.prestart, name="coinfer-ara-child-start", daemon=True).start()

    def set_charge_listener(self, fn) -> None:
        """``fn(session_id, cpu_ms)`` is called (on the planner thread) after each re-plan a session caused."""
        self._charge_listener = fn

    def close(self) -> None:
        """Stop the planner child (idempotent; later plans fail, the shares published last stay)."""
        if self.child is not None:
            self.child.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued re-plan is published (tests, shutdown). True if idle."""
        return self.queue.wait_idle(timeout)

    def calibration(self, session_id: str) -> float:
        """measured / claimed server cost factor the session's current plan uses (1.0: its claims as made;
        ``calibrate_server_costs``)."""
        return self.claims.scale(session_id)

    # -- planner CPU: charged to the identity whose session caused a re-plan ---------------------------

    def _plan_wait_s(self, sid: str) -> float:
        """Under the lock: seconds until ``sid``'s identity and the server may have another re-plan."""
        return self.budgets.wait_s(self._tenant_of.get(sid))

    def _frozen_for(self, sid: str) -> frozenset[str]:
        """Planner thread: the sessions ARA holds whose splits a re-plan ``sid`` causes does not re-solve:
        those of other identities whose passive planner bucket is in debt (``PlannerBudgets.passive_debt``).
        Their last plans are kept (``partitioner.allocation.ara``'s ``frozen``), so another identity's
        churn costs them nothing more, and they slow nobody's join."""
        with self._lock:
            key = self._tenant_of.get(sid)
            owners = {u: self._tenant_of.get(u) for u in self._in_ara if u != sid}
        out = set()
        debt: dict[str, bool] = {}
        for u, k in owners.items():
            if k is None or k == key:
                continue
            if k not in debt:
                debt[k] = self.budgets.passive_debt(k)
            if debt[k] and u in self._ara:
                out.add(u)
        return frozenset(out)

    def _charge(self, sid: str, cpu_s: float, work_s: dict[str, float] | None = None) -> None:
        """Planner thread: a re-plan ``sid`` caused took ``cpu_s`` of planner CPU, of which ``work_s[u]``
        (``Allocation.work_s``) were session u's own subproblems: each u of another identity is charged to
        that identity's passive bucket, the rest (``sid``'s identity's sessions' subproblems, the joint
        step, what was not measured per session) to ``sid``'s identity; all of it to the global bucket
        (``PlannerBudgets.charge``). The compute scheduler's fair turn of ``sid`` counts its identity's part."""
        with self._lock:
            key = self._tenant_of.get(sid)
            live = set(self._tenant_of.values())
            owner = {u: self._tenant_of.get(u) for u in (work_s or {})}
        if key is None:
            return
        others: dict[str, float] = {}
        for u, w in (work_s or {}).items():
            k = owner.get(u)
            if k is not None and k != key and w > 0:
                others[k] = others.get(k, 0.0) + w
        own = max(0.0, cpu_s - sum(others.values()))
        self.budgets.charge(key, own, live, others)
        if self._charge_listener is not None:
            try:
                self._charge_listener(sid, own * 1e3)
            except Exception:
                logger.exception("charging a re-plan failed")

    @staticmethod
    def _parse(profile: UeProfile):
        import json

        from partitioner import CostGraph, Link

        d = profile.cost_graph  # parsed and built once, by the servicer's strict decoder (in the sender's turn)
        if d is None:  # a profile made in-process (tests, embedders)
            d = json.loads(profile.cost_graph_json)  # never CostGraph.from_json: it reads paths
        if isinstance(d, CostGraph):
            graph = d
            if len(graph) > MAX_COST_GRAPH_OPS:
                raise ValueError(f"cost graph has {len(graph)} ops; ARA plans at most {MAX_COST_GRAPH_OPS}")
        else:
            ops = d.get("ops") if isinstance(d, dict) else None
            if isinstance(ops, list | dict) and len(ops) > MAX_COST_GRAPH_OPS:
                raise ValueError(f"cost graph has {len(ops)} ops; ARA plans at most {MAX_COST_GRAPH_OPS}")
            graph = CostGraph.from_dict(d)
        link = Link(profile.uplink_mbps, profile.downlink_mbps or None, profile.rtt_ms)
        return graph, link

    def _shares(self, published: dict[str, float] | None = None, floor: float = 1e-3) -> dict[str, float]:
        """Under the lock: equal 1/n, the profiled sessions' pool split by their ``published`` ARA shares
        (default: the compute shares phi), each at least ``floor`` (then scaled to sum to at most 1)."""
        n = len(self._sessions)
        if not n:
            return {}
        published = self._phis if published is None else published
        out = {sid: 1.0 / n for sid in self._sessions}
        phis = {sid: phi for sid, phi in published.items() if sid in self._sessions and sid in self._in_ara}
        total = sum(phis.values())
        if total > 0:
            pool = len(phis) / n  # what these sessions would hold with equal shares
            for sid, phi in phis.items():
                out[sid] = max(pool * phi / total, floor)
            s = sum(out.values())
            if s > 1:
                out = {sid: v / s for sid, v in out.items()}
        return out

    # -- planner -------------------------------------------------------------------------------------

    def _submit(self, job, delay_s: float = 0.0) -> None:
        self.queue.submit(job, delay_s)

    def _run_job(self, job) -> None:
        """Planner thread: apply one change to ARA, re-plan, publish the shares; charge the re-plan's CPU
        (this thread's and the planner child's): each session's own subproblems to its identity, the rest
        to whoever caused it (``_charge``); sessions of identities in passive debt are not re-solved
        (``_frozen_for``). A join or update whose identity's bucket went into debt since it was queued
        waits again."""
        kind, sid, _ = job
        # a claim correction ("measured") waits too: before, it re-planned at once however deep its identity's
        # debt (a UE whose measured op times kept falling got a re-plan of everybody per step outside its budget)
        if kind in ("join", "profile", "measured") and self.queue.background:  # checked here too: the charge of
            with self._lock:  # a re-plan that was running when this job was queued is known only now
                wait = self._plan_wait_s(sid)
            if wait > 0:
                self.queue.submit(job, wait)
                return
        child = self.child
        self._ara.frozen = self._frozen_for(sid)
        alloc0 = self._ara.allocation
        before, cpu, child_cpu = self.replans, time.thread_time(), child.cpu_s if child is not None else 0.0
        self._job_work, self._job_clock = {}, (cpu, child_cpu)
        if child is None:
            self._ara.cache.work_s = {}  # (an inline plan that fails leaves only its own work here)
        try:
            self._apply_job(job)
        finally:
            if self.replans != before:
                spent = time.thread_time() - cpu + ((child.cpu_s - child_cpu) if child is not None else 0.0)
                work = dict(self._job_work)  # a failed attempt's, by report or by size (``_drop_heaviest``)
                if self._ara.allocation is not alloc0:
                    for u, w in self._ara.allocation.work_s.items():
                        work[u] = work.get(u, 0.0) + w
                self._charge(sid, spent, work)
            if kind == "leave":
                with self._lock:
                    if sid not in self._sessions:
                        self._tenant_of.pop(sid, None)

    def _apply_job(self, job) -> None:
        """Planner thread: one change to ARA's problems and its re-plan. Every change first sets the ARA
        weights of the sessions in ARA (``ara_weights``: a tenant's sessions share its weight). A join or
        upload completion of a session that has left by now, and the leave of one ARA does not hold, plan
        nothing (an open/close storm costs no re-plans of everybody's sessions)."""
        kind, sid, payload = job
        if kind == "measured":
            payload = self.claims.correction(sid, sid in self._ara)
            if payload is None:
                return
            kind = "profile"  # re-plan the session with its calibrated costs
        elif kind == "profile":
            payload = self._take_profile(sid)
            if payload is None:
                with self._lock:
                    self._queued_at.pop(sid, None)
                return
        elif kind in ("join", "upload_done"):
            with self._lock:
                gone = sid not in self._sessions
            if gone:  # left before its join (or upload) was planned: nothing to plan for it
                return
            if kind == "upload_done" and sid not in self._ara:
                return  # its join is still to be planned (deferred by its tenant's planner bucket): it joins warm
            if kind == "join" and sid in self._ara:
                # a profile update planned before this deferred join (both wait on timers of their tenant's
                # bucket, run in either order) joined the session with the newer profile: nothing left to
                # plan. Before, this join failed ("already joined"), the session was dropped from ``_in_ara``
                # and its leave planned nothing: a ghost UE in every later plan
                return
        elif sid not in self._ara:  # a leave of a session ARA never held (its join was skipped or failed)
            return
        self.replans += 1
        try:
            with self._lock:
                weights = ara_weights({k: v for k, v in self._sessions.items() if k in self._in_ara})
            self._ara.set_weights(weights)
            if kind in ("join", "profile"):
                graph, link, weight, send_mbps = payload
                with self._lock:
                    left = sid not in self._sessions
                graph = graph if left else self._bounded(sid, self.claims.calibrated(sid, payload))
                w = weights.get(sid, weight)
                if kind == "profile" and sid in self._ara:
                    self._ara.update(sid, graph, link, weight=w, send_mbps=send_mbps)
                else:  # a join, or a profile of a session ARA does not hold (it had none, or a bad one)
                    with self._lock:
                        warm = sid in self._uploaded
                    self._ara.join(sid, graph, link, weight=w, send_mbps=send_mbps,
                                   state=ServerState.warm(graph) if warm else None)
            elif kind == "leave":
                self._forget(sid)
                self._ara.leave(sid)
            else:
                self._ara.upload_finished(sid)
        except Exception as e:  # bad client data, planner failure, planner child lost: nothing is published
            if self.child is not None and self.child.closed:  # the server is stopping: nothing to publish to
                logger.debug("session %s: ARA %s not planned: the server is stopping", sid[:8], kind)
                return
            self.failed_plans += 1
            if not self._drop_heaviest(sid, kind, e):
                if kind in ("join", "profile"):  # out of ARA's problems (no ghost): the equal share until its update
                    self._ara.forget(sid)
                    with self._lock:
                        self._in_ara.discard(sid)
                logger.warning("session %s: ARA %s failed (%s: %s); the shares published last stay in force%s",
                               sid[:8], kind, type(e).__name__, e,
                               "; the session holds the equal share" if kind in ("join", "profile") else "")
                return
        self._stale_plans += len(self._ara.allocation.stale)
        alloc = self._ara.allocation.shares
        phis = {k: (v.compute if v is not None else 0.0) for k, v in alloc.items()}
        betas = {k: (v.uplink if v is not None else 0.0) for k, v in alloc.items()}
        with self._lock:
            self._phis, self._betas = phis, betas
            shares = self._shares()
            queued = self._queued_at.pop(sid, None) if kind in ("join", "profile") else None
            if queued is not None and sid in self._sessions:
                self.plan_delays.setdefault(sid, []).append(time.monotonic() - queued)
        if self._listener is not None:
            try:
                self._listener(shares)
            except Exception:
                logger.exception("publishing ARA shares failed")

    def _drop_heaviest(self, sid: str, kind: str, e: Exception) -> bool:
        """Planner thread, after a re-plan ``sid`` caused failed with ``e``: record the failed plan's per-UE
        work for its charge (``_job_work``: what the planner child reported, or split by each
        re-solved UE's problem size, when it was stopped at a limit before any report). When it was stopped
        at a limit (``PlannerFailed.over_limit``: CPU budget or wall cap) and another identity's sessions
        did more of its work than ``sid``'s identity's sessions, those sessions leave ARA's problems (each
        holds the equal share until its owner's next profile update, as a failed join does) and the plan is
        tried once more without them: True when that retry planned (its shares are published). Else False
        (the causer's session leaves, as before)."""
        work = dict(getattr(e, "work_s", None) or {})
        if not work and self.child is None:
            work = {u: w for u, w in self._ara.cache.work_s.items() if u in self._ara}
        self._job_work = work
        over = bool(getattr(e, "over_limit", False))
        sizes: dict[str, int] = {}
        if over and not work:
            from partitioner.allocation import graph_size

            sizes = {u: graph_size(pb.graph) for u, pb in self._ara._ues.items()
                               if u not in self._ara.frozen}
            # the failed attempt's CPU split now, by size: a retry that plans adds only its own work (review34: the
            # failed attempt was otherwise charged whole to the causer once the retry succeeded)
            t0, c0 = self._job_clock
            failed = time.thread_time() - t0 + ((self.child.cpu_s - c0) if self.child is not None else 0.0)
            total = sum(sizes.values())
            if total > 0:
                self._job_work = {u: failed * n / total for u, n in sizes.items()}
        if not over or kind not in ("join", "profile"):
            return False
        by = work or sizes
        with self._lock:
            key = self._tenant_of.get(sid)
            owner = {u: self._tenant_of.get(u) for u in by}
        per: dict[str, float] = {}
        for u, w in by.items():
            if owner.get(u) is not None:
                per[owner[u]] = per.get(owner[u], 0.0) + w
        heavy = max(per, key=per.get, default=None)
        if heavy is None or heavy == key or per[heavy] <= per.get(key, 0.0):
            return False
        with self._lock:
            drop = [u for u in self._in_ara if self._tenant_of.get(u) == heavy and u in self._ara]
            self._in_ara.difference_update(drop)
        for u in drop:
            self._ara.forget(u)
        self.dropped_heavy += len(drop)
        logger.warning("session %s: ARA %s failed (%s); %d session(s) of the identity whose problems did %.1f of "
                       "its %.1f CPU s reported leave ARA (equal share until their next profile update); planning "
                       "again without them", sid[:8], kind, e, len(drop), per[heavy], sum(per.values()))
        try:
            self._ara.replan()
        except Exception as e2:
            logger.warning("session %s: ARA %s: the plan without them failed too (%s: %s)", sid[:8], kind,
                           type(e2).__name__, e2)
            more = getattr(e2, "work_s", None) or (self._ara.cache.work_s if self.child is None else {})
            self._job_work = dict(self._job_work)  # (the first attempt's, by report or by size, kept)
            for u, w in more.items():
                self._job_work[u] = self._job_work.get(u, 0.0) + w
            return False
        return True

    def _bounded(self, sid: str, graph):
        """Planner thread: the graph ARA plans ``sid`` with, bounded before the plan starts
        (``partitioner.allocation.bounded_graph``): of size (ops + weights) at most ``plan_size``, and at
        most what ``total_plan_size`` leaves beside the other sessions' graphs (a whole model, size <= 2,
        in any case)."""
        limit = min(self._plan_size, self._total_plan_size - self._ara.held_size(but=sid))
        bounded, rule = bounded_graph(graph, limit)
        if rule:
            with self._lock:
                self.bounded[rule] = self.bounded.get(rule, 0) + 1
            logger.info("session %s: cost graph of %d ops, %d weights planned %s (%d ops; ARA plans a size of "
                        "at most %d for it)", sid[:8], len(graph), len(graph.weights), rule, len(bounded), limit)
        return bounded

    def _forget(self, sid: str) -> None:
        with self._lock:
            self._forget_locked(sid)

    def _forget_locked(self, sid: str) -> None:
        """Under the lock: drop what the calibration of ``sid``'s claims kept, and its upload completion."""
        self.claims.forget(sid)
        self._uploaded.discard(sid)

    def on_measured(self, session_id: str, ops: Sequence[OpTime]) -> None:
        """Keep the least measured ms of each op of the session's claimed graph; queue a check of its claims
        (coalesced: at most one queued per session). The check re-plans only when the claims exceed the
        measurements by more than ``CLAIM_SLACK`` and the correction moved (``calibrate_server_costs``)."""
        with self._lock:
            if session_id not in self._in_ara:
                return
        if self.claims.record(session_id, ops):
            self._submit(("measured", session_id, None))

    def _take_profile(self, sid: str) -> tuple | None:
        """Planner thread: the session's latest queued profile update, parsed and applied to its
        SessionInfo, as a join/profile job's payload; None if it left or the profile does not parse (then
        the session stays as it was)."""
        with self._lock:
            profile = self._profile_queued.pop(sid, None)
            hold = self._holds.pop(sid, None)
        try:
            if profile is None:  # the session left before its update was planned
                return None
            try:
                graph, link = self._parse(profile)
            except Exception as e:
                # str(e), not e: a log record kept (a handler that buffers) held its frames and the parsed graph
                logger.warning("session %s: profile update ignored (%s: %s)", sid[:8], type(e).__name__, str(e))
                return None
        finally:
            if hold is not None:  # out of the queue: the graph is ARA's state of the session from here
                hold.release()
        with self._lock:
            info = self._sessions.get(sid)
            if info is None:
                return None
            info.weight = profile.weight or 1.0
            info.extra["profile"] = unparsed(profile)
            self._in_ara.add(sid)
        return graph, link, profile.weight or 1.0, profile.send_mbps

    # -- callbacks (never wait for a plan) -----------------------------------------------------------

    def on_join(self, info: SessionInfo) -> dict[str, float]:
        profile = info.extra.get("profile")
        parsed = None
        if profile is not None:
            try:
                graph, link = self._parse(profile)
                parsed = (graph, link, profile.weight or 1.0, profile.send_mbps)
            except Exception as e:  # bad client data: equal share for this one
                logger.warning("session %s: no ARA share (%s: %s)", info.session_id[:8], type(e).__name__, str(e))
        with self._lock:
            self._sessions[info.session_id] = info
            self._tenant_of[info.session_id] = info.planner_key or info.tenant
            if parsed is not None:
                self._in_ara.add(info.session_id)
                self._queued_at.setdefault(info.session_id, time.monotonic())
            wait = self._plan_wait_s(info.session_id) if parsed is not None else 0.0
        if parsed is not None:
            self._submit(("join", info.session_id, parsed), wait)
        with self._lock:
            return self._shares()

    def on_profile(self, session_id: str, profile: UeProfile, hold: Reservation | None = None) -> dict[str, float]:
        """Re-plan with the session's new profile (its weight, link, cost graph, send rate); a profile
        that does not parse leaves the session as it was. Planned on the planner thread once its tenant's
        planner bucket allows (``PLAN_CPU_SHARE``); updates of a session whose last update is still queued
        replace that one (coalesced: at most one queued re-plan per session, the latest update wins, the one
        replaced and its ``hold`` released). ``hold`` (its cost graph's memory in the tenant's budget) is
        kept while the graph waits in the queue."""
        submit, wait = False, 0.0
        with self._lock:
            if session_id not in self._sessions:
                old_hold = hold
            else:
                submit = session_id not in self._profile_queued  # else the queued job plans this newer profile
                self._profile_queued[session_id] = profile
                self._queued_at.setdefault(session_id, time.monotonic())
                old_hold = self._holds.pop(session_id, None)
                if hold is not None:
                    self._holds[session_id] = hold
                if submit:
                    wait = self._plan_wait_s(session_id)
        if old_hold is not None:
            old_hold.release()
        if submit:
            self._submit(("profile", session_id, None), wait)
        with self._lock:
            return self._shares()

    def on_leave(self, session_id: str) -> dict[str, float]:
        with self._lock:
            self._sessions.pop(session_id, None)
            self._profile_queued.pop(session_id, None)
            self._queued_at.pop(session_id, None)
            self.plan_delays.pop(session_id, None)
            hold = self._holds.pop(session_id, None)
            self._forget_locked(session_id)
            was = session_id in self._in_ara
            self._in_ara.discard(session_id)
            if not was:  # (else its leave is planned, and charged, first)
                self._tenant_of.pop(session_id, None)
        if hold is not None:
            hold.release()
        if was:
            self._submit(("leave", session_id, None))
        with self._lock:
            return self._shares()

    def on_upload_done(self, session_id: str) -> dict[str, float]:
        """The session holds every weight of its slices (told once per session). Kept: a join planned after
        it (deferred by the tenant's planner bucket, or a profile that comes later) joins ARA warm; before,
        the news reached ARA before the session did (a logged failure) and the session was planned cold for
        as long as it lived."""
        with self._lock:
            if session_id in self._sessions:
                self._uploaded.add(session_id)
            profiled = session_id in self._in_ara
        if profiled:
            self._submit(("upload_done", session_id, None))
        with self._lock:
            return self._shares()

    def preview_share(self, tenant: str) -> float:
        with self._lock:
            return 1.0 / (len(self._sessions) + 1)

    def shares(self) -> dict[str, float]:
        with self._lock:
            return self._shares()

    def uplink_shares(self) -> dict[str, float]:
        """ARA's uplink shares beta_n (``partitioner.allocation.allocate_epochs``: the best of equal,
        water-filling and Smith's rule with uplink re-allocated at each upload completion, each UE capped
        at what it can send) for the profiled sessions, times the pool they would hold with equal shares
        per tenant (``tenant_split``; all of it when every session is profiled); the others, and every
        session until its first plan is published, hold their ``tenant_split`` share. A session whose
        plan sends little or nothing gets at least ``UPLINK_FLOOR`` (it may still send a probe or a cut
        tensor after re-planning: at ARA's 1e-3 of an 8 Mbit/s cell a UE pacing to it, or a cell
        enforcing it, took minutes for 1 MB); when ARA plans no session to send, all keep their
        ``tenant_split`` shares. Never scaled up: ARA's shares of UEs at their send-rate cap
        may sum to less than 1 (nobody could use the rest)."""
        with self._lock:
            out = tenant_split(self._sessions)
            betas = {sid: b for sid, b in self._betas.items() if sid in self._sessions and sid in self._in_ara}
            if sum(betas.values()) <= 0:  # ARA plans nobody to send: they keep their tenant shares
                return out
            pool = sum(out[sid] for sid in betas)
            for sid, b in betas.items():
                out[sid] = max(pool * b, UPLINK_FLOOR)
            s = sum(out.values())
            return {sid: v / s for sid, v in out.items()} if s > 1 else out
