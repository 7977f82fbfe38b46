"""The single adapter between the runtime and the partitioner: one call, one small result.

Why a wrapper: the runtime needs only the server set, the need-ordered uploads, the simulated latency
of exactly what it will do (parallel need-ordered upload with what the server holds) and, for
progressive offloading, the warm target. Keeping the partitioner's API behind this function makes a
change there a one-place change here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from partitioner import CostGraph, Link
from partitioner.simulate import simulate
from partitioner.state import ServerState, Shares

log = logging.getLogger(__name__)

POLICIES = ("auto", "local", "offload", "neurosurgeon", "dads", "cic", "mjoa", "robust", "optimal")


def _plan_fn():
    try:
        from partitioner import plan as fn  # the package export, once it exists
        if callable(fn):
            return fn
    except ImportError:
        pass
    from partitioner.planners import plan as fn

    return fn


@dataclass(frozen=True)
class PlanChoice:
    policy: str
    """The policy that decided (``auto`` resolves to mjoa)."""
    server_ops: frozenset[str]
    predicted_ms: float
    """Simulated latency of this partition as the runtime runs it: parallel, need-ordered upload of what
    the server lacks (the same ruler for every policy)."""
    warm_ms: float
    serial_ms: float
    """Simulated latency with every missing weight uploaded first (the serial-upload baseline)."""
    upload_order: tuple[str, ...] = ()
    warm_target: frozenset[str] | None = None
    background: tuple[str, ...] = ()
    """Weights (by name) to stream at the lowest priority for later requests (progressive offloading)."""
    decision_ms: float = 0.0
    feasible: bool = True
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def choose(policy: str, costs: CostGraph, link: Link, *, state: ServerState | None = None,
           share: Shares | None = None, deadline_ms: float | None = None, budget_s: float = 0.3,
           target: frozenset[str] | None = None) -> PlanChoice:
    """Plan one request.

    ``auto`` = progressive offloading: an mjoa plan (parallel upload, with what the server holds) plus
    the warm target's remaining weights as background uploads; ``target`` keeps the target of earlier
    requests (None: take mjoa's).
    """
    t0 = time.perf_counter()
    name = "mjoa" if policy == "auto" else policy
    background: tuple[str, ...] = ()
    if policy == "auto":
        from partitioner.progressive import next_request

        if target is None:
            # The target is fixed once per link estimate: give its (warm) search a real budget so a
            # busy CPU does not leave it at a heuristic incumbent.
            target = _plan_fn()("mjoa", costs, link, share=share, budget_s=max(1.0, 3 * budget_s)).warm_target
        step = next_request(costs, link, state, share=share, target=target, budget_s=budget_s)
        p, background = step.plan, tuple(step.background)
        warm_target = step.target
    else:
        opts: dict[str, Any] = {}
        if name == "mjoa":
            opts["budget_s"] = budget_s
        elif name == "robust":
            # Without an explicit deadline: at most 1.5x the local mean (local itself has a spread).
            opts["deadline_ms"] = deadline_ms if deadline_ms is not None else 1.5 * sum(op.ue_ms for op in costs.ops)
        elif name == "optimal":
            opts["budget_s"] = max(budget_s, 1.0)
        p = _plan_fn()(name, costs, link, state=state, share=share, **opts)
        warm_target = p.warm_target
    server = frozenset(p.server_ops)
    reason = p.reason
    if not p.feasible and name == "robust":
        reason = reason or "no partition meets the deadline"
    serial = simulate(costs, link, server, mode="serial", state=state, share=share, timeline=False).latency_ms \
        if server else p.cold_ms
    return PlanChoice(policy=name, server_ops=server, predicted_ms=p.cold_ms, warm_ms=p.warm_ms, serial_ms=serial,
                      upload_order=tuple(p.upload_order), warm_target=warm_target, background=background,
                      decision_ms=(time.perf_counter() - t0) * 1e3, feasible=p.feasible, reason=reason,
                      details=dict(p.details))


def predict(costs: CostGraph, link: Link, server_ops: frozenset[str], *, state: ServerState | None = None,
            share: Shares | None = None, mode: str = "cold") -> float:
    """Simulated latency of one partition (used to re-score a plan after the link estimate moved)."""
    return simulate(costs, link, server_ops, mode=mode, state=state, share=share, timeline=False).latency_ms


def fixed(server_ops: frozenset[str], costs: CostGraph, link: Link, *, state: ServerState | None = None,
          share: Shares | None = None) -> PlanChoice:
    """A partition the caller chose (e.g. from ``coinfer-ue plan``), scored like any plan."""
    t0 = time.perf_counter()
    server = frozenset(server_ops)
    cold = simulate(costs, link, server, mode="cold", state=state, share=share, timeline=False)
    warm = predict(costs, link, server, state=state, share=share, mode="warm")
    serial = predict(costs, link, server, state=state, share=share, mode="serial")
    return PlanChoice(policy="fixed", server_ops=server, predicted_ms=cold.latency_ms, warm_ms=warm,
                      serial_ms=serial, upload_order=cold.upload_order,
                      decision_ms=(time.perf_counter() - t0) * 1e3)
