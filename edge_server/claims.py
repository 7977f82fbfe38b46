"""Each ARA session's claimed server costs beside what the server measured running its ops: the cost
graph ARA may plan the session with, and when a session must be re-planned because the measurements
moved (``calibrate_server_costs``; README, Shared cell uplink: "The cost graph is a claim too")."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from protos.values import OpTime

logger = logging.getLogger(__name__)

__all__ = ["CLAIM_SLACK", "RECALIBRATE_FACTOR", "ClaimChecks", "calibrate_server_costs"]

CLAIM_SLACK = 2.0
"""How far a UE's claimed server costs may exceed what the server measured running the same ops before
ARA stops believing them (``calibrate_server_costs``). An honest UE's server costs come from this server's
own ProfileGraph, so measured / claimed stays near 1; the slack absorbs load and warm-up."""
RECALIBRATE_FACTOR = 1.25
"""A session's correction is re-planned only when it moved by more than this factor (each re-plan plans
every profiled session)."""


def calibrate_server_costs(graph, measured: dict[str, float], slack: float = CLAIM_SLACK, unnamed_ms: float = 0.0):
    """The cost graph ARA may plan a UE with, given the server's own measurements of the UE's ops.

    A UE's cost graph is its claim: claiming every op 100x dearer on the server took ARA's compute share
    from 0.5 to 0.91 against an honest UE of another tenant (phi_n grows with sqrt(w_n C_n), MJOA-MU
    ARA). ``measured`` maps op name -> the least ms the server measured running that op for this session
    (``ServerTimings.ops``). r = sum measured / sum claimed over those ops; when the claims exceed the
    measurements by more than ``slack`` (r < 1 / slack) the measured ops get their measured cost and every
    other op its claim x r (variances x r^2). Claims below the measurements are kept: understating costs
    only shrinks the UE's own share. Returns ``(graph, r)``, r = 1.0 when nothing was changed.

    ``unnamed_ms``: the least ms of one request's ops that the server ran for the session and the graph
    does not name (> 0: the claim does not describe what runs; the server never checks the graph against
    the slice). Then r = (sum measured + ``unnamed_ms``) / the graph's whole claimed server cost: a UE
    that renamed its ops kept a 100x claim, and ~10 / 11 of the server, however many of them ran
    (``tests/test_ara_claims.py``). An honest UE's graph names every op of its slices (both come from the
    same model graph), so this never shrinks it.

    Ops never run on the server keep a scaled claim, so a UE may still inflate the ops it never offloads;
    its share then serves ops it does run, at most what its true work takes (the scheduler is
    work-conserving)."""
    claimed = seen = 0.0
    for op in graph.ops:
        ms = measured.get(op.name)
        if ms is not None:
            claimed += op.server_ms
            seen += ms
    if unnamed_ms > 0:
        claimed = sum(op.server_ms for op in graph.ops)
        seen += unnamed_ms
    if claimed <= 0 or seen <= 0 or seen * slack >= claimed:
        return graph, 1.0
    r = seen / claimed
    server_ms = {op.name: measured.get(op.name, op.server_ms * r) for op in graph.ops}
    server_var = {op.name: op.server_var * r * r for op in graph.ops}
    return graph.with_server_costs(server_ms, server_var), r


@dataclass
class _ClaimCheck:
    """One session's claimed server costs beside the server's measurements of them (``AraShareAllocator``;
    every field is guarded by ``ClaimChecks``' lock)."""

    claim: tuple
    """The profile as claimed (graph, link, weight, send rate), before calibration: its latest plan's."""
    op_names: frozenset[str]
    """The ops the claimed graph names."""
    measured: dict[str, float] = field(default_factory=dict)
    """Op name -> least ms the server measured running it (ops of the claimed graph only)."""
    unnamed_ms: float | None = None
    """Least ms of one request's ops the server ran that the claimed graph does not name (None: none yet)."""
    scale: float = 1.0
    """The measured / claimed factor the session's current plan used (1.0: its claims)."""
    check_queued: bool = False
    """A check of the claims is queued on the planner thread (coalesced: one per session)."""


class ClaimChecks:
    """The claim checks of the sessions ARA plans (thread-safe): :meth:`calibrated` on the planner thread
    when a session's claim is planned, :meth:`record` on the event loop when the server ran a request of
    it, :meth:`correction` on the planner thread for a queued check, :meth:`forget` when it leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checks: dict[str, _ClaimCheck] = {}
        self.corrections = 0
        """Re-plans because a session's claimed server costs exceeded the server's measurements."""

    def calibrated(self, sid: str, claim: tuple):
        """The claimed graph of ``claim`` (graph, link, weight, send rate) as ARA may plan it
        (``calibrate_server_costs`` against what the server measured for ``sid`` so far); the claim is kept
        for later checks (a profile update keeps the measurements so far)."""
        graph = claim[0]
        names = frozenset(op.name for op in graph.ops)
        with self._lock:
            check = self._checks.get(sid)
            if check is None:
                check = self._checks[sid] = _ClaimCheck(claim, names)
            else:
                check.claim, check.op_names = claim, names
            measured, unnamed = dict(check.measured), check.unnamed_ms or 0.0
        calibrated, r = calibrate_server_costs(graph, measured, unnamed_ms=unnamed)
        with self._lock:
            before, check.scale = check.scale, r
        if r < 1.0 and before == 1.0:
            logger.info(
                "session %s: claimed server costs are %.3g x what the server measured; ARA plans with the measurements",
                sid[:8],
                1.0 / r,
            )
        return calibrated

    def correction(self, sid: str, planned: bool) -> tuple | None:
        """The queued check of ``sid`` (``planned``: ARA holds the session): its claim, if the server's
        measurements now move its calibration by more than ``RECALIBRATE_FACTOR`` (then it is re-planned
        with it); else None."""
        with self._lock:
            check = self._checks.get(sid)
            if check is None:
                return None
            check.check_queued = False
            claim, measured, unnamed = check.claim, dict(check.measured), check.unnamed_ms or 0.0
            applied = check.scale
        if not planned:
            return None
        _, r = calibrate_server_costs(claim[0], measured, unnamed_ms=unnamed)
        if max(r, applied) / min(r, applied) <= RECALIBRATE_FACTOR:
            return None
        with self._lock:
            self.corrections += 1
        return claim

    def record(self, sid: str, ops: Sequence[OpTime]) -> bool:
        """Keep the least measured ms of each op of ``sid``'s claimed graph (and of the ops it does not
        name, per request). True when a check should be queued now (coalesced: one queued per session)."""
        with self._lock:
            check = self._checks.get(sid)
            if check is None:
                return False
            names, m = check.op_names, check.measured
            unnamed = 0.0
            for op in ops:
                name, ms = op.name, op.ms
                if not ms >= 0:
                    continue
                if name not in names:
                    unnamed += ms  # ran, yet the claim does not name it
                elif name not in m or ms < m[name]:
                    m[name] = ms
            if unnamed > 0:
                old = check.unnamed_ms
                check.unnamed_ms = unnamed if old is None else min(old, unnamed)
            if check.check_queued:
                return False
            check.check_queued = True
            return True

    def scale(self, sid: str) -> float:
        """measured / claimed factor of ``sid``'s current plan (1.0: its claims as made)."""
        with self._lock:
            check = self._checks.get(sid)
            return 1.0 if check is None else check.scale

    def forget(self, sid: str) -> None:
        with self._lock:
            self._checks.pop(sid, None)
