"""How the server's compute is shared among sessions: the hook the partitioner's ARA plugs into.

The server calls the allocator when a session joins, leaves, or finishes uploading its weights; the
allocator returns the new share of every open session (weights of a weighted fair queue, summing to at
most 1). The compute scheduler serves sessions in proportion to these shares. The default gives every
open session an equal share; ARA (MJOA-MU) would give phi_n proportional to sqrt(w_n C_n).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


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
