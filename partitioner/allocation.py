"""Multi-UE allocation (ARA of MJOA-MU): server compute shares phi_n and uplink shares beta_n.

For fixed partitions each UE's latency is modelled as
    T_n = max(F_n, U_n / beta_n) + V_n / beta_n + C_n / phi_n + K_n
(F: local compute; U: weight upload at full rate, overlapping local compute; V: cut tensors, sent after
it; C: server compute at the full server; K: 2L + result downlink), an upper bound of the chain
formula. sum w_n T_n is separable and convex: phi_n ∝ sqrt(w_n C_n) (closed form); beta by
water-filling on a price lambda, with the kink beta = U_n/F_n where the upload just hides behind
local compute. ``ara`` alternates this with per-UE re-planning, accepting only steps that lower the
simulated weighted latency (monotone, so it terminates). ``Allocator`` is what the server calls when a
UE joins, leaves or finishes its upload.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from partitioner.costgraph import CostGraph, Link
from partitioner.errors import PartitionerError
from partitioner.plan import Plan
from partitioner.planners import plan
from partitioner.prep import prepare
from partitioner.simulate import Rates, run
from partitioner.state import ServerState, Shares

log = logging.getLogger(__name__)
_MIN_SHARE = 1e-9


@dataclass(frozen=True)
class UeDemand:
    """One UE's fixed-partition parameters, in ms at full shares."""

    ue_id: str
    weight: float
    local_ms: float
    overlap_up_ms: float
    tail_up_ms: float
    server_ms: float
    fixed_ms: float
    offloads: bool = True

    def latency(self, phi: float, beta: float) -> float:
        if not self.offloads:
            return self.local_ms
        up = self.overlap_up_ms / beta if self.overlap_up_ms else 0.0
        tail = self.tail_up_ms / beta if self.tail_up_ms else 0.0
        srv = self.server_ms / phi if self.server_ms else 0.0
        return max(self.local_ms, up) + tail + srv + self.fixed_ms


def demand_of(ue_id: str, graph: CostGraph, link: Link, server_ops: frozenset[str],
              state: ServerState | None = None, weight: float = 1.0) -> UeDemand:
    P = prepare(graph)
    m = P.mask_of(server_ops)
    r = Rates.of(link)
    res = run(P, m, r, "cold", state)
    srv = sum(P.c[i] for i in range(P.n) if m >> i & 1)
    res_b = sum(P.result_bytes[i] for i in range(P.n) if m >> i & 1)
    return UeDemand(ue_id, weight, res.ue_finish_ms, res.upload_bytes / r.up, res.sent_tensor_bytes / r.up,
                    srv, 2 * r.L + res_b / r.dn, offloads=bool(m))


def compute_shares(demands: list[UeDemand]) -> dict[str, float]:
    """phi_n ∝ sqrt(w_n C_n): the closed-form optimum of sum w_n C_n / phi_n s.t. sum phi <= 1."""
    roots = {d.ue_id: math.sqrt(d.weight * d.server_ms) if d.offloads else 0.0 for d in demands}
    tot = sum(roots.values())
    k = sum(1 for d in demands if d.offloads)
    if tot <= 0:
        return {d.ue_id: (1.0 / k if d.offloads else 0.0) for d in demands}
    return {u: v / tot for u, v in roots.items()}


def _beta(d: UeDemand, lam: float) -> float:
    if not d.offloads or d.overlap_up_ms + d.tail_up_ms <= 0:
        return 0.0
    tot = d.weight * (d.overlap_up_ms + d.tail_up_ms)
    kink = d.overlap_up_ms / d.local_ms if d.local_ms > 0 else math.inf
    b = math.sqrt(tot / lam)
    if b < kink:
        return b
    b2 = math.sqrt(d.weight * d.tail_up_ms / lam)
    return b2 if b2 > kink else kink


def uplink_shares(demands: list[UeDemand], iters: int = 200) -> dict[str, float]:
    """Water-filling: beta_n(lambda) minimises w_n T_n + lambda beta_n; bisect lambda so sum beta = 1."""
    active = [d for d in demands if _beta(d, 1.0) > 0]
    out = {d.ue_id: 0.0 for d in demands}
    if not active:
        return out
    lo, hi = 1e-30, 1.0
    while sum(_beta(d, hi) for d in active) > 1:
        hi *= 4
    while sum(_beta(d, lo) for d in active) < 1 and lo < 1e300:
        lo *= 4
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if sum(_beta(d, mid) for d in active) > 1:
            lo = mid
        else:
            hi = mid
    for d in active:
        out[d.ue_id] = _beta(d, hi)
    s = sum(out.values())
    if s > 1:  # numerical guard
        out = {k: v / s for k, v in out.items()}
    return out


@dataclass(frozen=True)
class FixedAllocation:
    compute: dict[str, float]
    uplink: dict[str, float]
    objective_ms: float
    """sum w_n T_n under the allocation model."""


def allocate_fixed(demands: list[UeDemand]) -> FixedAllocation:
    if len({d.ue_id for d in demands}) != len(demands):
        raise PartitionerError("duplicate UE ids in allocation")
    phi = compute_shares(demands)
    beta = uplink_shares(demands)
    obj = 0.0
    for d in demands:
        obj += d.weight * d.latency(max(phi[d.ue_id], _MIN_SHARE), max(beta[d.ue_id], _MIN_SHARE))
    return FixedAllocation(phi, beta, obj)


def equal_shares(demands: list[UeDemand]) -> FixedAllocation:
    k = sum(1 for d in demands if d.offloads)
    s = {d.ue_id: (1.0 / k if d.offloads else 0.0) for d in demands}
    obj = sum(d.weight * d.latency(max(s[d.ue_id], _MIN_SHARE), max(s[d.ue_id], _MIN_SHARE)) for d in demands)
    return FixedAllocation(dict(s), dict(s), obj)


@dataclass(frozen=True)
class UeProblem:
    """One UE as the allocator sees it: its cost graph, its link, its weight in the objective and what
    the server already holds for it. (``Ue*`` like ``partitioner.uecpu.UeCpu``: one spelling of UE.)"""

    ue_id: str
    graph: CostGraph
    link: Link
    weight: float = 1.0
    state: ServerState | None = None


@dataclass(frozen=True)
class Allocation:
    shares: dict[str, Shares | None]
    """None for a UE that runs everything locally (it needs no server share)."""
    plans: dict[str, Plan]
    objective_ms: float
    """sum w_n * simulated latency with these shares."""
    history: tuple[float, ...] = field(default_factory=tuple)
    """Objective after each accepted step: non-increasing."""


def _to_shares(fa: FixedAllocation, ue: str) -> Shares | None:
    phi, beta = fa.compute.get(ue, 0.0), fa.uplink.get(ue, 0.0)
    if phi <= 0 and beta <= 0:
        return None
    return Shares(compute=min(1.0, max(phi, _MIN_SHARE)), uplink=min(1.0, max(beta, _MIN_SHARE)))


def _sim_objective(problems: dict[str, UeProblem], masks: dict[str, frozenset[str]],
                   shares: dict[str, Shares | None]) -> float:
    tot = 0.0
    for u, pb in problems.items():
        P = prepare(pb.graph)
        m = P.mask_of(masks[u])
        if m and shares[u] is None:
            return math.inf
        tot += pb.weight * run(P, m, Rates.of(pb.link, shares[u]), "cold", pb.state).latency_ms
    return tot


def ara(problems: list[UeProblem], *, policy: str = "mjoa", max_rounds: int = 10,
        policy_options: dict | None = None) -> Allocation:
    """Alternate share allocation (fixed partitions) with per-UE re-planning; accept only improvements."""
    opts = dict(policy_options or {})
    if policy == "mjoa":
        opts.setdefault("budget_s", 0.2)
    pbs = {p.ue_id: p for p in problems}
    if len(pbs) != len(problems):
        raise PartitionerError("duplicate UE ids in allocation")
    if not pbs:
        return Allocation({}, {}, 0.0, ())
    n = len(pbs)
    eq = Shares(1.0 / n, 1.0 / n)
    plans = {u: plan(policy, p.graph, p.link, state=p.state, share=eq, **opts) for u, p in pbs.items()}

    def shares_for(pl: dict[str, Plan]) -> dict[str, Shares | None]:
        dem = [demand_of(u, pbs[u].graph, pbs[u].link, pl[u].server_ops, pbs[u].state, pbs[u].weight)
               for u in pbs]
        fa = allocate_fixed(dem)
        return {u: _to_shares(fa, u) for u in pbs}

    masks = {u: p.server_ops for u, p in plans.items()}
    eq_sh = {u: (eq if masks[u] else None) for u in pbs}
    sh = shares_for(plans)
    j_eq, j = _sim_objective(pbs, masks, eq_sh), _sim_objective(pbs, masks, sh)
    if j_eq <= j:
        sh, j = eq_sh, j_eq
    hist = [j]
    for _ in range(max_rounds):
        improved = False
        for u, pb in pbs.items():
            trial_share = sh[u] or eq
            cand = plan(policy, pb.graph, pb.link, state=pb.state, share=trial_share, **opts)
            if cand.server_ops == masks[u]:
                continue
            plans2 = {**plans, u: cand}
            masks2 = {**masks, u: cand.server_ops}
            sh2 = shares_for(plans2)
            j2 = _sim_objective(pbs, masks2, sh2)
            if j2 < j - 1e-9 * max(1.0, j):
                plans, masks, sh, j = plans2, masks2, sh2, j2
                hist.append(j)
                improved = True
        if not improved:
            break
    # report each plan under its final share
    final = {}
    for u, pb in pbs.items():
        final[u] = plans[u] if sh[u] is None else _rescore(pb, plans[u], sh[u])
    return Allocation(sh, final, j, tuple(hist))


def _rescore(pb: UeProblem, p: Plan, share: Shares) -> Plan:
    from dataclasses import replace

    P = prepare(pb.graph)
    m = P.mask_of(p.server_ops)
    r = Rates.of(pb.link, share)
    return replace(p, cold_ms=run(P, m, r, "cold", pb.state).latency_ms,
                   warm_ms=run(P, m, r, "warm", pb.state).latency_ms,
                   details={**p.details, "share": share.to_dict()})


class Allocator:
    """Server-side allocation state: call on join, leave, or when a UE's upload finished."""

    def __init__(self, *, policy: str = "mjoa", max_rounds: int = 10, policy_options: dict | None = None):
        self.policy = policy
        self.max_rounds = max_rounds
        self.policy_options = policy_options
        self._ues: dict[str, UeProblem] = {}
        self.allocation = Allocation({}, {}, 0.0, ())

    def _recompute(self) -> Allocation:
        self.allocation = ara(list(self._ues.values()), policy=self.policy, max_rounds=self.max_rounds,
                              policy_options=self.policy_options)
        log.info("allocation for %d UEs: objective %.2f ms", len(self._ues), self.allocation.objective_ms)
        return self.allocation

    def join(self, ue_id: str, graph: CostGraph, link: Link, *, weight: float = 1.0,
             state: ServerState | None = None) -> Allocation:
        if ue_id in self._ues:
            raise PartitionerError(f"UE {ue_id!r} already joined")
        self._ues[ue_id] = UeProblem(ue_id, graph, link, weight, state)
        return self._recompute()

    def leave(self, ue_id: str) -> Allocation:
        if self._ues.pop(ue_id, None) is None:
            raise PartitionerError(f"UE {ue_id!r} is not allocated")
        return self._recompute()

    def update_state(self, ue_id: str, state: ServerState) -> Allocation:
        pb = self._ues.get(ue_id)
        if pb is None:
            raise PartitionerError(f"UE {ue_id!r} is not allocated")
        self._ues[ue_id] = UeProblem(ue_id, pb.graph, pb.link, pb.weight, state)
        return self._recompute()

    def upload_finished(self, ue_id: str) -> Allocation:
        """The UE's weights are all on the server: it is warm from now on."""
        pb = self._ues.get(ue_id)
        if pb is None:
            raise PartitionerError(f"UE {ue_id!r} is not allocated")
        return self.update_state(ue_id, ServerState.warm(pb.graph))
