"""How the server's compute is shared among sessions: the hook the partitioner's ARA plugs into.

The server calls the allocator when a session joins, leaves, or finishes uploading its weights; the
allocator returns the new share of every open session (weights of a weighted fair queue, summing to at
most 1). The compute scheduler serves sessions in proportion to these shares. The default gives every
open session an equal share; ARA (MJOA-MU) would give phi_n proportional to sqrt(w_n C_n).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from protos.values import UeProfile

logger = logging.getLogger(__name__)


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


class AraShareAllocator(ShareAllocator):
    """Adapter to the partitioner's ARA (``partitioner.allocation.Allocator``).

    Sessions that sent a :class:`protos.values.UeProfile` take part in ARA: their compute shares phi_n (proportional to
    sqrt(w_n C_n) for their current plans) split the part of the server that profiled sessions hold;
    sessions without a profile get an equal 1/n each. If ARA fails (bad profile data, planner error),
    the allocator falls back to equal shares and logs why. Callbacks may take a while (ARA re-plans):
    the session manager calls them off the event loop.
    """

    def __init__(self, **allocator_options) -> None:
        from partitioner.allocation import Allocator

        self._ara = Allocator(**allocator_options)
        self._sessions: dict[str, SessionInfo] = {}
        self._in_ara: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def _parse(profile: UeProfile):
        import json

        from partitioner import CostGraph, Link

        d = json.loads(profile.cost_graph_json)  # never CostGraph.from_json: it reads paths
        graph = CostGraph.from_dict(d)
        link = Link(profile.uplink_mbps, profile.downlink_mbps or None, profile.rtt_ms)
        return graph, link

    def _shares(self) -> dict[str, float]:
        n = len(self._sessions)
        if not n:
            return {}
        out = {sid: 1.0 / n for sid in self._sessions}
        alloc = self._ara.allocation.shares if self._in_ara else {}
        phis = {sid: (s.compute if s is not None else 0.0) for sid, s in alloc.items() if sid in self._sessions}
        total = sum(phis.values())
        if total > 0:
            pool = len(phis) / n  # what these sessions would hold with equal shares
            for sid, phi in phis.items():
                out[sid] = max(pool * phi / total, 1e-3)
        return out

    def on_join(self, info: SessionInfo) -> dict[str, float]:
        with self._lock:
            self._sessions[info.session_id] = info
            profile = info.extra.get("profile")
            if profile is not None:
                try:
                    graph, link = self._parse(profile)
                    self._ara.join(info.session_id, graph, link, weight=profile.weight or 1.0)
                    self._in_ara.add(info.session_id)
                except Exception as e:  # bad client data or planner failure: equal share for this one
                    logger.warning("session %s: no ARA share (%s: %s)", info.session_id[:8], type(e).__name__, e)
            return self._shares()

    def on_leave(self, session_id: str) -> dict[str, float]:
        with self._lock:
            self._sessions.pop(session_id, None)
            if session_id in self._in_ara:
                self._in_ara.discard(session_id)
                try:
                    self._ara.leave(session_id)
                except Exception:
                    logger.exception("ARA leave failed")
            return self._shares()

    def on_upload_done(self, session_id: str) -> dict[str, float]:
        with self._lock:
            if session_id in self._in_ara:
                try:
                    self._ara.upload_finished(session_id)
                except Exception:
                    logger.exception("ARA upload_finished failed")
            return self._shares()

    def preview_share(self, tenant: str) -> float:
        with self._lock:
            return 1.0 / (len(self._sessions) + 1)

    def shares(self) -> dict[str, float]:
        with self._lock:
            return self._shares()
