"""How the server's compute is shared among sessions: the hook the partitioner's ARA plugs into.

The server calls the allocator when a session joins, leaves, or finishes uploading its weights; the
allocator returns the new share of every open session (weights of a weighted fair queue, summing to at
most 1). The compute scheduler serves sessions in proportion to these shares. The default gives every
open session an equal share; ARA (MJOA-MU) gives phi_n proportional to sqrt(w_n C_n).

Uplink shares (``uplink_shares``): the fraction beta_n of the cell's uplink each session should use
(summing to at most 1). The server cannot shape the radio link; it tells each UE its beta_n
(``SessionOpened.uplink_share``, ``ShareChanged.uplink_share``) and the UE paces its uplink to
beta_n x the cell rate (``ue_client.session.UplinkQueue``).
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from partitioner.allocation import UPLINK_FLOOR
from protos.values import UeProfile

logger = logging.getLogger(__name__)

__all__ = ["UPLINK_FLOOR", "AraShareAllocator", "EqualShareAllocator", "SessionInfo", "ShareAllocator"]


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
    extra: dict = field(default_factory=dict)


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
        """1/n of the cell's uplink for each of the n open sessions."""
        with self._lock:
            return self._equal()


class AraShareAllocator(ShareAllocator):
    """Adapter to the partitioner's ARA (``partitioner.allocation.Allocator``).

    Sessions that sent a :class:`protos.values.UeProfile` take part in ARA: their compute shares phi_n (proportional to
    sqrt(w_n C_n) for their current plans) split the part of the server that profiled sessions hold;
    sessions without a profile get an equal 1/n each. If ARA fails (bad profile data, planner error),
    the allocator falls back to equal shares and logs why.

    Planning never blocks a caller: ARA re-plans (seconds for a large cost graph) run on one planner
    thread that owns the partitioner's state; the callbacks only update the session table under a short
    lock and return the shares known now (a new profiled session has an equal share until its plan is
    published). Each finished plan is published atomically and handed to the listener
    (:meth:`set_listener`), which applies it. ``background=False`` plans in the caller (tests, tools).
    """

    def __init__(self, *, background: bool = True, **allocator_options) -> None:
        from partitioner.allocation import Allocator

        self._ara = Allocator(**allocator_options)
        self._sessions: dict[str, SessionInfo] = {}
        self._in_ara: set[str] = set()
        self._phis: dict[str, float] = {}
        """The last published ARA compute shares (session id -> phi)."""
        self._betas: dict[str, float] = {}
        """The last published ARA uplink shares (session id -> beta)."""
        self._lock = threading.Lock()
        self._listener = None
        self._background = background
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._planner: threading.Thread | None = None

    def set_listener(self, fn) -> None:
        """``fn(shares)`` is called (on the planner thread) with every share table a finished plan gives."""
        self._listener = fn

    @staticmethod
    def _parse(profile: UeProfile):
        import json

        from partitioner import CostGraph, Link

        d = json.loads(profile.cost_graph_json)  # never CostGraph.from_json: it reads paths
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

    def _submit(self, job) -> None:
        if not self._background:
            self._run_job(job)
            return
        with self._lock:
            self._pending += 1
            if self._planner is None:
                self._planner = threading.Thread(target=self._plan_loop, name="coinfer-ara-planner", daemon=True)
                self._planner.start()
        self._jobs.put(job)

    def _plan_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                self._run_job(job)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._idle.notify_all()

    def _run_job(self, job) -> None:
        """Planner thread: apply one change to ARA, re-plan, publish the shares."""
        kind, sid, payload = job
        try:
            if kind == "join":
                graph, link, weight = payload
                self._ara.join(sid, graph, link, weight=weight)
            elif kind == "leave":
                self._ara.leave(sid)
            else:
                self._ara.upload_finished(sid)
            alloc = self._ara.allocation.shares
            phis = {k: (v.compute if v is not None else 0.0) for k, v in alloc.items()}
            betas = {k: (v.uplink if v is not None else 0.0) for k, v in alloc.items()}
        except Exception as e:  # bad client data or planner failure: that session keeps an equal share
            logger.warning("session %s: ARA %s failed (%s: %s)", sid[:8], kind, type(e).__name__, e)
            if kind == "join":
                with self._lock:
                    self._in_ara.discard(sid)
            return
        with self._lock:
            self._phis, self._betas = phis, betas
            shares = self._shares()
        if self._listener is not None:
            try:
                self._listener(shares)
            except Exception:
                logger.exception("publishing ARA shares failed")

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued re-plan is published (tests, shutdown). True if idle."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    # -- callbacks (never wait for a plan) -----------------------------------------------------------

    def on_join(self, info: SessionInfo) -> dict[str, float]:
        profile = info.extra.get("profile")
        parsed = None
        if profile is not None:
            try:
                graph, link = self._parse(profile)
                parsed = (graph, link, profile.weight or 1.0)
            except Exception as e:  # bad client data: equal share for this one
                logger.warning("session %s: no ARA share (%s: %s)", info.session_id[:8], type(e).__name__, e)
        with self._lock:
            self._sessions[info.session_id] = info
            if parsed is not None:
                self._in_ara.add(info.session_id)
        if parsed is not None:
            self._submit(("join", info.session_id, parsed))
        with self._lock:
            return self._shares()

    def on_leave(self, session_id: str) -> dict[str, float]:
        with self._lock:
            self._sessions.pop(session_id, None)
            was = session_id in self._in_ara
            self._in_ara.discard(session_id)
        if was:
            self._submit(("leave", session_id, None))
        with self._lock:
            return self._shares()

    def on_upload_done(self, session_id: str) -> dict[str, float]:
        with self._lock:
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
        water-filling and Smith's rule with uplink re-allocated at each upload completion) for the
        profiled sessions, scaled to the pool they would hold with equal shares; 1/n for the others and
        for every session until its first plan is published. A session whose plan sends little or
        nothing gets at least ``UPLINK_FLOOR`` (it may still send a probe or a cut tensor after
        re-planning: at ARA's 1e-3 of an 8 Mbit/s cell a UE pacing to it, or a cell enforcing it, took
        minutes for 1 MB)."""
        with self._lock:
            return self._shares(self._betas, UPLINK_FLOOR)
