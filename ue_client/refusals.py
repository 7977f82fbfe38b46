"""Splits whose slice a server refused (``SliceRejected``), kept per server address and slice hash, for the
planner to leave out (``ue_client.planning.choose``'s ``exclude`` / ``allow``).

Before, a refused split stayed the planner's choice: every later request of the session asked for it
again and ran locally as a flagged fallback (and a prefetch target the server refused had a special
case in the engine). Now a refusal is an exclusion: the next decision takes the best other partition by
the same prediction (``planning.next_best``). A refusal says something about that slice on that server
(its size against the server's budgets, an op over the per-op limits) and maybe about every slice (a
session at its slice cap, a tenant's memory share in use): after ``MAX_REFUSALS`` refusals by one
server within ``RETRY_S`` the planner may use only the splits that server accepted before (else it runs
locally), rather than try one candidate after another. Refusals are forgotten after ``RETRY_S`` (the
server's load, budgets and limits change), and a slice the server accepts later clears its refusal.

Only permanent refusals count toward ``MAX_REFUSALS`` (``PERMANENT``: INVALID_ARGUMENT and
FAILED_PRECONDITION, the slice itself is wrong for that server). A transient one (RESOURCE_EXHAUSTED: a
memory share or a session's slice cap in use now; anything else) says the server is busy, not that the
split is wrong: the planner uses only the splits that server accepted (else runs locally) for a back-off,
``TRANSIENT_BACKOFF_S`` doubling with each transient refusal by that server in a row (up to ``RETRY_S``;
an acceptance starts it over), then plans freely again (the refused split first, if it is still the
best). Three RESOURCE_EXHAUSTED answers of a busy server kept the UE local for 300 s before.

Owned by the caller's thread (the engine's): the session's receiver thread only appends to
``SessionStream.slice_answers``, which :meth:`RequestPath.sync_refusals` drains.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MAX_ACCEPTED",
    "MAX_REFUSALS",
    "PERMANENT",
    "RETRY_S",
    "TRANSIENT_BACKOFF_S",
    "Refusal",
    "RefusedSlices",
]

RETRY_S = 300.0
"""Seconds a refusal excludes its split (then the planner may ask again)."""
MAX_REFUSALS = 3
"""Refusals by one server within ``RETRY_S`` after which only the splits it accepted are planned."""
MAX_ACCEPTED = 64
"""Accepted splits remembered per server (the latest)."""
PERMANENT = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION"})
"""Refusal codes that say the slice is wrong for the server (they count toward ``MAX_REFUSALS``)."""
TRANSIENT_BACKOFF_S = 5.0
"""Seconds of accepted-only planning after a server's first transient refusal (doubled per repeat in a
row, at most ``RETRY_S``)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    server_ops: frozenset[str]
    slice_sha256: str
    """sha256 of the slice's JSON (``modelgraph`` slice spec): the slice the server refused."""
    code: str
    """The status the server refused it with (e.g. RESOURCE_EXHAUSTED)."""
    message: str
    at: float
    """``clock()`` when it was seen."""
    until: float = float("inf")
    """``clock()`` at which it is forgotten (``at + RETRY_S`` when permanent, the back-off when transient)."""
    repeats: int = 1
    """Transient refusals by the server in a row, this one included (the back-off doubles with each)."""

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT


_NOTHING: tuple[frozenset[frozenset[str]], None] = (frozenset(), None)
"""``RefusedSlices.exclusion`` of a server that refused nothing: nothing left out, any split permitted."""


class RefusedSlices:
    """Refused and accepted slices per server address (see the module)."""

    def __init__(self, *, retry_s: float = RETRY_S, max_refusals: int = MAX_REFUSALS,
                 backoff_s: float = TRANSIENT_BACKOFF_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_s, self.max_refusals, self.backoff_s, self.clock = retry_s, max_refusals, backoff_s, clock
        self._refused: dict[str, dict[str, Refusal]] = {}
        """server -> slice sha256 -> its refusal."""
        self._busy: dict[str, tuple[int, float, float]] = {}
        """server -> (transient refusals in a row, clock of the last, end of its back-off), until the server
        accepts a slice or ``retry_s`` passed since the last."""
        self._accepted: dict[str, OrderedDict[frozenset[str], None]] = {}

    def refused(self, server: str, server_ops: frozenset[str], slice_sha256: str, code: str, message: str) -> None:
        """``server`` refused the slice (``slice_sha256``) of the split with ``server_ops`` with status ``code``:
        left out for ``retry_s`` if permanent (``PERMANENT``), else for its back-off."""
        now = self.clock()
        if code in PERMANENT:
            until, repeats = now + self.retry_s, 1
        else:
            n, last, _ = self._busy.get(server, (0, now, now))
            repeats = 1 if now - last > self.retry_s else n + 1
            until = now + min(self.retry_s, self.backoff_s * 2 ** min(repeats - 1, 32))
            self._busy[server] = (repeats, now, until)
        self._refused.setdefault(server, {})[slice_sha256] = Refusal(server_ops, slice_sha256, code, message, now,
                                                                    until, repeats)
        acc = self._accepted.get(server)
        if acc is not None:
            acc.pop(server_ops, None)

    def accepted(self, server: str, server_ops: frozenset[str], slice_sha256: str) -> None:
        """``server`` defined the slice of ``server_ops`` (SliceDefined): it may be planned again."""
        self._refused.get(server, {}).pop(slice_sha256, None)
        self._busy.pop(server, None)
        acc = self._accepted.setdefault(server, OrderedDict())
        acc[server_ops] = None
        acc.move_to_end(server_ops)
        while len(acc) > MAX_ACCEPTED:
            acc.popitem(last=False)

    def _live(self, server: str) -> dict[str, Refusal]:
        refs = self._refused.get(server)
        if not refs:
            return {}
        now = self.clock()
        for sha in [s for s, r in refs.items() if now >= r.until]:
            del refs[sha]
        busy = self._busy.get(server)
        if busy is not None and now - busy[1] > self.retry_s:
            del self._busy[server]
        return refs

    def backing_off(self, server: str) -> bool:
        """``server`` refused a slice transiently and its back-off is not over: plan only accepted splits."""
        busy = self._busy.get(server)
        return busy is not None and self.clock() < busy[2]

    def refusal(self, server: str, server_ops: frozenset[str]) -> Refusal | None:
        """The live refusal of ``server_ops`` by ``server``, if any."""
        for r in self._live(server).values():
            if r.server_ops == server_ops:
                return r
        return None

    def has_refused(self, server: str) -> bool:
        """``server`` refused some slice within ``retry_s``."""
        return bool(self._live(server))

    def is_accepted(self, server: str, server_ops: frozenset[str]) -> bool:
        return server_ops in self._accepted.get(server, ())

    def quiet(self, server: str) -> bool:
        """No refusal by ``server`` is kept (live or expired) and no back-off from it: ``exclusion`` is
        (nothing, None) whatever the clock says."""
        return not self._refused.get(server) and server not in self._busy

    def exclusion(self, server: str) -> tuple[frozenset[frozenset[str]], frozenset[frozenset[str]] | None]:
        """(server sets to leave out, the only ones permitted or None) for planning against ``server``: every
        live refusal is left out; the planner uses only the splits the server accepted while it backs off
        from a transient refusal, and after ``max_refusals`` live permanent ones."""
        if self.max_refusals > 0 and self.quiet(server):  # (the common case, asked before every request)
            return _NOTHING
        refs = self._live(server)
        exclude = frozenset(r.server_ops for r in refs.values())
        allow = None
        if self.backing_off(server) or sum(r.permanent for r in refs.values()) >= self.max_refusals:
            allow = frozenset(self._accepted.get(server, ())) - exclude
        return exclude, allow
