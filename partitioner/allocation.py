"""Multi-UE allocation (ARA of MJOA-MU): server compute shares phi_n and uplink shares beta_n.

For fixed partitions each UE's latency is modelled as
    T_n = max(F_n, U_n / beta_n) + V_n / beta_n + C_n / phi_n + K_n
(F: local compute; U: weight upload at full rate, overlapping local compute; V: cut tensors, sent after
it; C: server compute at the full server; K: 2L + result downlink), an upper bound of the chain
formula. With shares held for the whole round, sum w_n T_n is separable and convex: phi_n ∝ sqrt(w_n C_n)
(closed form); beta by water-filling on a price lambda, with the kink beta = U_n/F_n where the upload
just hides behind local compute (``allocate_fixed``; DESIGN.md §5, MJOA-MU's ARA).

The runtime does not hold uplink shares for the whole round: it re-allocates whenever a UE's upload
finishes (DESIGN.md §5), so the cell's uplink is work-conserving over time and a share only decides who
finishes first. Under that the static optimum is wrong in kind: sqrt(w_n U_n) gives the bigger upload
the bigger share, which delays the small one and speeds the big one not at all (it finishes when the
cell has carried both, whatever the split). Measured on the testbed (8 Mbit/s cell, a 2.3 MB and a
1.3 MB upload): equal 3.7 / 2.6 s, water-filling 0.58/0.42 3.7 / 3.0 s, as this epoch model predicts.
``allocate_epochs`` evaluates allocation rules in epochs between upload completions, re-applying the
rule to what is left at each, and keeps the best of: equal shares, the static water-filling, and
Smith's rule (weighted shortest processing time first: order by U_n / w_n, optimal for the weighted
sum of completion times on one work-conserving resource; W. E. Smith, "Various optimizers for
single-stage production", Naval Res. Logist. Q. 3, 1956). Every offloading UE keeps at least the share
under which its own planner keeps its split (``UeDemand.min_uplink``): a UE re-plans with the share it
is told, so a starved UE would otherwise move its split (or run locally) and ARA's plan would not be
the one that runs.

A share a UE cannot use is a wrong allocation: a UE on a small CPU budget cannot send faster than
its CPU-bound send rate (``partitioner.uecpu.UeCpu.rate_mbps``, which the UE reports in its profile), so
each UE's uplink share is capped at ``UeDemand.max_uplink`` = that rate / the cell rate, and every rule
gives what a capped UE cannot use to the others: MJOA-MU's ARA objective (the weighted latency sum,
DESIGN.md §5) under the extra constraints beta_n <= c_n, solved by water-filling with caps (the KKT
point clips each UE's beta_n(lambda) at c_n and moves lambda until the shares sum to 1 or every UE is
at its cap), processor sharing with caps (max-min fair: ``_fill``) for equal shares, and Smith's order
taking at most c_n per UE. Shares may then sum to less than 1: nobody could use the rest.

``ara`` alternates this with per-UE re-planning (each UE at the share it holds and at the whole cell),
accepting only steps that lower the simulated weighted latency (monotone, so it terminates).
``Allocator`` is what the server calls when a UE joins, leaves or finishes its upload.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from partitioner.costgraph import CostGraph, Link, OpCost
from partitioner.errors import PartitionerError
from partitioner.plan import Plan
from partitioner.planners import plan
from partitioner.prep import prepare
from partitioner.simulate import Rates, run
from partitioner.state import ServerState, Shares

log = logging.getLogger(__name__)
_MIN_SHARE = 1e-9
UPLINK_FLOOR = 1 / 64
"""The smallest uplink share an offloading UE is given (``allocate_epochs``; the edge server's floor and
the testbed cell's guaranteed class rate): it may still send a probe or a cut tensor after re-planning."""


@dataclass(frozen=True)
class UeDemand:
    """One UE's fixed-partition parameters, in ms at full shares (the whole server, the whole cell)."""

    ue_id: str
    weight: float
    local_ms: float
    overlap_up_ms: float
    tail_up_ms: float
    server_ms: float
    fixed_ms: float
    offloads: bool = True
    min_uplink: float = 0.0
    """The smallest uplink share under which this UE's planner keeps this partition (0: any share);
    ``allocate_epochs`` never gives an offloading UE less (nor more than ``max_uplink``)."""
    max_uplink: float = 1.0
    """The largest uplink share this UE can use: its CPU-bound send rate / the cell rate, at most 1
    (``UeProblem.max_uplink``); every rule gives it at most this and the rest to the others."""

    def latency(self, phi: float, beta: float) -> float:
        if not self.offloads:
            return self.local_ms
        up = self.overlap_up_ms / beta if self.overlap_up_ms else 0.0
        tail = self.tail_up_ms / beta if self.tail_up_ms else 0.0
        srv = self.server_ms / phi if self.server_ms else 0.0
        return max(self.local_ms, up) + tail + srv + self.fixed_ms


def demand_of(ue_id: str, graph: CostGraph, link: Link, server_ops: frozenset[str],
              state: ServerState | None = None, weight: float = 1.0, max_uplink: float = 1.0) -> UeDemand:
    """The fixed-partition parameters of ``server_ops`` on this UE (ms at the whole cell and server)."""
    P = prepare(graph)
    m = P.mask_of(server_ops)
    r = Rates.of(link)
    res = run(P, m, r, "cold", state)
    srv = sum(P.c[i] for i in range(P.n) if m >> i & 1)
    res_b = sum(P.result_bytes[i] for i in range(P.n) if m >> i & 1)
    return UeDemand(ue_id, weight, res.ue_finish_ms, res.upload_bytes / r.up, res.sent_tensor_bytes / r.up,
                    srv, 2 * r.L + res_b / r.dn, offloads=bool(m), max_uplink=max_uplink)


def compute_shares(demands: list[UeDemand]) -> dict[str, float]:
    """phi_n ∝ sqrt(w_n C_n): the closed-form optimum of sum w_n C_n / phi_n s.t. sum phi <= 1."""
    roots = {d.ue_id: math.sqrt(d.weight * d.server_ms) if d.offloads else 0.0 for d in demands}
    tot = sum(roots.values())
    k = sum(1 for d in demands if d.offloads)
    if tot <= 0:
        return {d.ue_id: (1.0 / k if d.offloads else 0.0) for d in demands}
    return {u: v / tot for u, v in roots.items()}


def _beta(d: UeDemand, lam: float) -> float:
    """The share minimising w_n T_n(beta) + lambda beta over [0, max_uplink] (T_n convex in 1/beta)."""
    if not d.offloads or d.overlap_up_ms + d.tail_up_ms <= 0:
        return 0.0
    tot = d.weight * (d.overlap_up_ms + d.tail_up_ms)
    kink = d.overlap_up_ms / d.local_ms if d.local_ms > 0 else math.inf
    b = math.sqrt(tot / lam)
    if b >= kink:
        b2 = math.sqrt(d.weight * d.tail_up_ms / lam)
        b = b2 if b2 > kink else kink
    return min(b, d.max_uplink)


def uplink_shares(demands: list[UeDemand], iters: int = 200) -> dict[str, float]:
    """Water-filling with caps: beta_n(lambda) minimises w_n T_n + lambda beta_n over [0, max_uplink_n];
    bisect lambda so sum beta = 1, or every UE at its cap when the caps sum to at most 1."""
    active = [d for d in demands if _beta(d, 1.0) > 0]
    out = {d.ue_id: 0.0 for d in demands}
    if not active:
        return out
    if sum(d.max_uplink for d in active) <= 1:  # nobody can use more than its cap: lambda -> 0
        for d in active:
            out[d.ue_id] = d.max_uplink
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


UPLINK_RULES = ("equal", "waterfill", "smith")
"""The uplink allocation rules ``allocate_epochs`` compares."""


@dataclass(frozen=True)
class EpochAllocation:
    """Uplink shares with re-allocation at every upload completion (``allocate_epochs``)."""

    compute: dict[str, float]
    uplink: dict[str, float]
    """The shares of the first epoch: what the UEs are told now."""
    effective: dict[str, float]
    """Each UE's mean uplink share over its upload (U_n / its upload's finish time; the first share for
    a UE with nothing to upload): the constant share that finishes its upload when the epochs do."""
    finish_ms: dict[str, float]
    """When each UE's weight upload completes (ms from now; 0 for none)."""
    objective_ms: float
    """sum w_n T_n under the epoch model."""
    rule: str
    """The rule chosen (one of ``UPLINK_RULES``)."""
    objectives: dict[str, float] = field(default_factory=dict)
    """sum w_n T_n of every rule compared."""


def _with_floors(demands: list[UeDemand], want: dict[str, float]) -> dict[str, float]:
    """Raise each offloading UE to its ``min_uplink`` (at most its ``max_uplink``) and scale the others'
    excess so the sum stays <= 1."""
    mins = {d.ue_id: (_floor(d) if d.offloads else 0.0) for d in demands}
    base = sum(mins.values())
    if base >= 1:
        return {u: m / base for u, m in mins.items()}
    extra = {u: max(0.0, want.get(u, 0.0) - mins[u]) for u in mins}
    tot = sum(extra.values())
    scale = min(1.0, (1 - base) / tot) if tot > 0 else 0.0
    return {u: mins[u] + extra[u] * scale for u in mins}


def _floor(d: UeDemand) -> float:
    """An offloading UE's least share: its ``min_uplink`` and ``UPLINK_FLOOR``, but never above its cap."""
    return min(max(d.min_uplink, UPLINK_FLOOR), d.max_uplink)


def _fill(caps: dict[str, float], total: float = 1.0) -> dict[str, float]:
    """Max-min fair shares of ``total`` under per-UE caps (processor sharing where a UE that cannot use
    its equal part gives the rest to the others): progressive filling, the smallest caps first."""
    out: dict[str, float] = {}
    left, rest = total, sorted(caps, key=lambda u: (caps[u], u))
    while rest:
        even = left / len(rest)
        u = rest[0]
        if caps[u] <= even:
            out[u] = caps[u]
            left -= caps[u]
            rest.pop(0)
        else:
            for v in rest:
                out[v] = even
            break
    return out


def _rule_shares(rule: str, demands: list[UeDemand], rem: dict[str, float], now_ms: float) -> dict[str, float]:
    """One epoch's uplink shares under ``rule``: ``rem`` is each uploading UE's remaining upload (ms at
    the full cell rate), ``now_ms`` the time since the round started. Sums to at most 1."""
    off = [d for d in demands if d.offloads]
    if not off:
        return {d.ue_id: 0.0 for d in demands}
    if rule == "equal":  # processor sharing: the uploading UEs alike (up to their caps), the others their floors
        up = [d for d in off if rem.get(d.ue_id, 0.0) > 0] or off
        want = _fill({d.ue_id: d.max_uplink for d in up})
    elif rule == "waterfill":
        left = [replace(d, overlap_up_ms=rem.get(d.ue_id, 0.0), local_ms=max(0.0, d.local_ms - now_ms))
                for d in off]
        want = uplink_shares(left)
        if sum(want.values()) <= 0:
            want = _fill({d.ue_id: d.max_uplink for d in off})
    elif rule == "smith":
        # every offloading UE its floor; the uploaders in order of remaining upload / weight take what
        # they can use (the whole rest up to their cap, or just enough to hide the upload behind local
        # compute); what is left goes down the same order up to the caps
        want = {d.ue_id: _floor(d) for d in off}
        free = 1.0 - sum(want.values())
        order = sorted((d for d in off if rem.get(d.ue_id, 0.0) > 0),
                       key=lambda d: (rem[d.ue_id] / max(d.weight, _MIN_SHARE), d.ue_id))
        for d in order:
            if free <= 0:
                break
            hide_ms = d.local_ms - now_ms
            need = min(rem[d.ue_id] / hide_ms if hide_ms > 0 else math.inf, d.max_uplink)
            take = min(free, max(0.0, need - want[d.ue_id]))
            want[d.ue_id] += take
            free -= take
        if free > 1e-12 and order:  # everyone can hide: the rest to the first in order, up to the caps
            for d in order:
                take = min(free, max(0.0, d.max_uplink - want[d.ue_id]))
                want[d.ue_id] += take
                free -= take
        elif free > 1e-12:  # nobody uploads weights: the rest spread over all, up to the caps
            more = _fill({d.ue_id: max(0.0, d.max_uplink - want[d.ue_id]) for d in off}, free)
            for u, v in more.items():
                want[u] += v
    else:
        raise PartitionerError(f"unknown uplink rule {rule!r}; choose one of {', '.join(UPLINK_RULES)}")
    return _with_floors(demands, want)


def epoch_schedule(demands: list[UeDemand], rule: str) -> tuple[dict[str, float], dict[str, float]]:
    """Uploads under ``rule`` re-applied at every completion: (first epoch's shares, each UE's upload
    finish time in ms, 0 when it uploads nothing). A UE that uploads weights sends its cut tensors on the
    same share (they go first), so its upload is U_n + V_n. A UE with a share of 0 never finishes (inf)."""
    rem = {d.ue_id: d.overlap_up_ms + d.tail_up_ms for d in demands if d.offloads and d.overlap_up_ms > 0}
    finish = {d.ue_id: 0.0 for d in demands}
    first = _rule_shares(rule, demands, rem, 0.0)
    sh, t = first, 0.0
    while rem:
        dt = min((r / sh[u] for u, r in rem.items() if sh[u] > _MIN_SHARE), default=math.inf)
        if not math.isfinite(dt):
            for u in rem:
                finish[u] = math.inf
            break
        t += dt
        for u in list(rem):
            rem[u] -= sh[u] * dt
            if rem[u] <= 1e-9 * max(1.0, t):
                finish[u] = t
                del rem[u]
        if rem:
            sh = _rule_shares(rule, demands, rem, t)
    return first, finish


def allocate_epochs(demands: list[UeDemand], rules: tuple[str, ...] = UPLINK_RULES) -> EpochAllocation:
    """ARA's uplink allocation when shares are re-allocated at every upload completion (see the module
    docstring): each rule of ``rules`` is run in epochs, each uploading UE's latency is
    max(F_n, finish_n) + C_n / phi_n + K_n (finish_n: when its weights and cut tensors are through),
    a UE with nothing to upload has F_n + V_n / beta_n + C_n / phi_n + K_n (beta_n: its first share;
    phi_n ∝ sqrt(w_n C_n)), and the rule with the least sum w_n T_n wins (ties: the earlier in
    ``rules``). Raises PartitionerError on duplicate UE ids or an unknown rule."""
    if len({d.ue_id for d in demands}) != len(demands):
        raise PartitionerError("duplicate UE ids in allocation")
    phi = compute_shares(demands)
    best: EpochAllocation | None = None
    best_var = 0.0
    objectives: dict[str, float] = {}
    # the UEs that run locally add the same w_n x local_ms to every rule's sum: the rules are compared on the
    # rest (a local UE's claimed 1e15 ms made every rule's sum tie within 1e-9 of it: the first rule won)
    fixed = sum(d.weight * d.local_ms for d in demands if not d.offloads)
    for rule in rules:
        first, finish = epoch_schedule(demands, rule)
        var, eff = 0.0, {}
        for d in demands:
            u = d.ue_id
            if not d.offloads:
                eff[u] = 0.0
                continue
            srv = d.server_ms / max(phi[u], _MIN_SHARE) if d.server_ms else 0.0
            if d.overlap_up_ms > 0:
                var += d.weight * (max(d.local_ms, finish[u]) + srv + d.fixed_ms)
                eff[u] = ((d.overlap_up_ms + d.tail_up_ms) / finish[u] if 0 < finish[u] < math.inf
                          else first[u])
            else:
                tail = d.tail_up_ms / max(first[u], _MIN_SHARE) if d.tail_up_ms else 0.0
                var += d.weight * (d.local_ms + tail + srv + d.fixed_ms)
                eff[u] = first[u]
        obj = fixed + var
        objectives[rule] = obj
        if best is None or var < best_var - 1e-9 * max(1.0, var):
            best, best_var = EpochAllocation(phi, first, eff, finish, obj, rule), var
    assert best is not None
    return replace(best, objectives=objectives)


@dataclass(frozen=True)
class UeProblem:
    """One UE as the allocator sees it: its cost graph, its link, its weight in the objective and what
    the server already holds for it. (``Ue*`` like ``partitioner.uecpu.UeCpu``: one spelling of UE.)"""

    ue_id: str
    graph: CostGraph
    link: Link
    weight: float = 1.0
    state: ServerState | None = None
    send_mbps: float = 0.0
    """The most this UE can send, Mbit/s: its CPU-bound send rate (its CPU budget / its CPU cost per
    byte sent, ``partitioner.uecpu.UeCpu.rate_mbps``, reported in its profile); 0: not limited."""

    @property
    def max_uplink(self) -> float:
        """The largest share of ``link``'s uplink (the cell) this UE can use: send_mbps / the uplink
        rate, at most 1 (1 when ``send_mbps`` is 0)."""
        if self.send_mbps <= 0 or self.link.uplink_mbps <= 0:
            return 1.0
        return min(1.0, self.send_mbps / self.link.uplink_mbps)


PLAN_SIZE = 1536
"""Largest size (ops + weights, ``graph_size``) of one UE's cost graph that ``bounded_graph`` lets ARA plan
as it is (the largest model this project captures: densenet121, 431 ops + 606 weights). ARA's cost grows
with the ops and the weights it holds (the simulator walks every weight): a join beside a googlenet UE took
1.0 / 2.7 / 5.3 / 48 CPU s for a 500 / 1000 / 2000 / 10000-op chain (one weight per op; mjoa, one CPU),
and a re-plan beside one op carrying 10k weights 0.66 CPU s."""
TOTAL_PLAN_SIZE = 4 * PLAN_SIZE
"""Largest size of all UEs' graphs together that ``bounded_graph`` lets ARA plan (each re-plan plans every
UE): a UE whose graph would take the sum over it is planned contracted or whole."""


def graph_size(graph: CostGraph) -> int:
    """Ops + weights of ``graph``: what one ARA plan's cost grows with (``PLAN_SIZE``)."""
    return len(graph.ops) + len(graph.weights)


def whole_model(graph: CostGraph) -> CostGraph:
    """``graph`` as one op (named ``"whole"``): every op's UE and server ms (and variances) summed, one
    weight ``"whole.weights"`` of all its weights' bytes (none when they are 0), the graph's inputs,
    out_bytes the bytes of its outputs; offloadable only when every op is. A planner on it chooses between
    all on the UE and all on the server (the cheaper rule of ``bounded_graph``); no op or weight of
    ``graph`` keeps its name."""
    total = int(sum(graph.weights.values()))
    weights = {"whole.weights": total} if total > 0 else {}
    out_bytes = {op.name: op.out_bytes for op in graph.ops}
    out_bytes.update(graph.inputs)
    op = OpCost(
        name="whole",
        inputs=tuple(graph.inputs),
        weights=tuple(weights),
        out_bytes=int(sum(out_bytes[o] for o in dict.fromkeys(graph.outputs))),
        ue_ms=math.fsum(o.ue_ms for o in graph.ops),
        ue_var=math.fsum(o.ue_var for o in graph.ops),
        server_ms=math.fsum(o.server_ms for o in graph.ops),
        server_var=math.fsum(o.server_var for o in graph.ops),
        offloadable=all(o.offloadable for o in graph.ops),
    )
    return CostGraph(ops=(op,), inputs=graph.inputs, outputs=("whole",), weights=weights,
                     model=graph.model, model_hash=graph.model_hash)


def bounded_graph(graph: CostGraph, max_size: int = PLAN_SIZE, contract_ops: int = 1024) -> tuple[CostGraph, str]:
    """The graph ARA plans a UE with, bounded before any plan starts (ARA's planning cost grows with the
    ops and weights it holds, ``graph_size``; ``PLAN_SIZE``). Returns ``(graph, rule)``:

    * ``rule = ""``: ``graph`` itself when its size is at most ``max_size`` (every captured model);
    * ``"contracted"``: its chain contraction (``partitioner.compress.contract``: a chain segment's cut
      positions that are optimal for no link or share merged; exact for the additive warm cost, CIC,
      IJCNN 2022) when the graph has at most ``contract_ops`` ops and the contraction's size is at most
      ``max_size``;
    * ``"whole"``: else ``whole_model(graph)`` (one op: the UE offloads all or nothing in ARA's plan;
      9 ms for 10k ops).

    The contraction's own cost grows with the graph and its branches (one CPU: a 2000-op chain 0.07 s, a
    2000-op graph of branches 0.38 s, 10k ops of branches 1.85 s), hence ``contract_ops``. The whole
    model's size is at most 2, whatever ``max_size``."""
    if graph_size(graph) <= max_size:
        return graph, ""
    if len(graph) > contract_ops:
        return whole_model(graph), "whole"
    from partitioner.compress import contract  # (numpy/scipy, loaded only for a large graph)

    small, _ = contract(graph)
    if graph_size(small) <= max_size:
        return small, "contracted"
    return whole_model(graph), "whole"


def _capped(pb: UeProblem, share: Shares | None) -> Shares | None:
    """``share`` with its uplink part at most what the UE can use (``UeProblem.max_uplink``)."""
    if share is None or share.uplink <= pb.max_uplink:
        return share
    return Shares(compute=share.compute, uplink=pb.max_uplink)


@dataclass(frozen=True)
class Allocation:
    shares: dict[str, Shares | None]
    """None for a UE that runs everything locally (it needs no server share)."""
    plans: dict[str, Plan]
    objective_ms: float
    """sum w_n * simulated latency with these shares."""
    history: tuple[float, ...] = field(default_factory=tuple)
    """Objective after each accepted step: non-increasing."""
    uplink_rule: str = ""
    """The uplink rule of ``allocate_epochs`` behind ``shares`` ("" when no UE offloads)."""
    predicted_ms: dict[str, float] = field(default_factory=dict)
    """Each UE's simulated latency of its next request (cold where weights are missing) at its effective
    uplink share: what ARA expects the UE to measure."""
    work_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds (this thread's) each UE's own subproblems took in this plan: its plans at the shares
    tried, the shares that keep its split, its simulations (``SubproblemCache``; 0 for a memo hit). What
    the plan cost beyond their sum is the joint step (the share allocation, the bookkeeping). Empty when
    the planner does not measure it."""
    stale: frozenset[str] = frozenset()
    """UEs whose split was not re-solved in this plan (``ara``'s ``frozen``): their last plan was reused."""


def _to_shares(fa: FixedAllocation, ue: str) -> Shares | None:
    phi, beta = fa.compute.get(ue, 0.0), fa.uplink.get(ue, 0.0)
    if phi <= 0 and beta <= 0:
        return None
    return Shares(compute=min(1.0, max(phi, _MIN_SHARE)), uplink=min(1.0, max(beta, _MIN_SHARE)))


def _sim_latencies(problems: dict[str, UeProblem], masks: dict[str, frozenset[str]],
                   shares: dict[str, Shares | None], cache: SubproblemCache | None = None) -> dict[str, float]:
    """Each UE's simulated latency (ms; what the server holds for it, ``UeProblem.state``) at ``shares``
    (each UE's CPU time counted in ``cache.work_s`` when given)."""
    if cache is not None:
        return {u: cache.timed(u, _sim_latencies, {u: pb}, masks, shares)[u] for u, pb in problems.items()}
    out = {}
    for u, pb in problems.items():
        P = prepare(pb.graph)
        m = P.mask_of(masks[u])
        if m and shares[u] is None:
            out[u] = math.inf
            continue
        out[u] = run(P, m, Rates.of(pb.link, _capped(pb, shares[u])), "cold", pb.state).latency_ms
    return out


def _sim_objective(problems: dict[str, UeProblem], masks: dict[str, frozenset[str]],
                   shares: dict[str, Shares | None]) -> float:
    return _weighted(problems, _sim_latencies(problems, masks, shares))


def _weighted(problems: dict[str, UeProblem], lat: dict[str, float]) -> float:
    """sum_n w_n x latency_n (ms), ARA's objective."""
    return sum(problems[u].weight * v for u, v in lat.items())


def _lowers(problems: dict[str, UeProblem], lat: dict[str, float], lat2: dict[str, float]) -> bool:
    """Whether the per-UE latencies ``lat2`` lower ARA's objective below ``lat``'s, by more than 1e-9 of the
    latencies that changed. The change is summed per UE, not taken between the two sums: one UE's claimed
    cost graph of 1e15 ms (in range, accepted) made the sums ~5e15, where a relative tolerance of the whole
    sum (5e6 ms) and the doubles' resolution (~1 ms) swallowed every other UE's improvement, and ARA left
    them all at their equal-share plans (a victim next to such a claim got no share at all)."""
    j, j2 = _weighted(problems, lat), _weighted(problems, lat2)
    if not (math.isfinite(j) and math.isfinite(j2)):
        return j2 < j  # a plan that needs a share it was not given is inf: finite beats it
    delta = scale = 0.0
    for u, pb in problems.items():
        a, b = lat[u], lat2[u]
        if a != b:
            delta += pb.weight * (b - a)
            scale += pb.weight * max(a, b)
    return delta < -1e-9 * max(1.0, scale)


def keep_share(pb: UeProblem, p: Plan, *, policy: str, compute: float, lo: float = UPLINK_FLOOR, iters: int = 6,
               margin: float = 1.1, **policy_options) -> float:
    """The smallest uplink share (within ``margin``, found by bisection on a log scale over [lo, cap]; cap
    = ``pb.max_uplink``, the most the UE can use) at which ``policy`` on this UE, planning with that share
    and compute share ``compute``, still chooses ``p``'s partition (at most the cap). 0.0 when ``p``
    offloads nothing, when even ``lo`` keeps it, or when the cap does not (no floor keeps it). What a UE
    needs so that re-planning with the share it is told keeps the split ARA assumed."""
    if not p.server_ops:
        return 0.0
    comp = min(1.0, max(compute, 1e-3))
    cap = pb.max_uplink
    lo = min(lo, cap)

    def keeps(s: float) -> bool:
        q = plan(policy, pb.graph, pb.link, state=pb.state, share=Shares(comp, min(s, cap)), **policy_options)
        return q.server_ops == p.server_ops

    if keeps(lo) or not keeps(cap):
        return 0.0
    a, b = lo, cap  # a: changes the plan, b: keeps it
    for _ in range(iters):
        m = math.sqrt(a * b)
        if keeps(m):
            b = m
        else:
            a = m
    return min(cap, b * margin)


SUBPROBLEM_MEMO = 256
"""Most memoized solves ``SubproblemCache`` keeps per UE (least recently used dropped first)."""


def _state_key(state: ServerState | None) -> tuple | None:
    return None if state is None else (state.held, tuple(sorted(state.in_flight.items())))


class _UeMemo:
    """One UE's memo in ``SubproblemCache``: for one graph object, its solves and its last plan."""

    __slots__ = ("graph", "last_keep", "last_plan", "solved")

    def __init__(self, graph: CostGraph) -> None:
        self.graph = graph
        self.solved: OrderedDict[tuple, object] = OrderedDict()
        self.last_plan: Plan | None = None
        self.last_keep: OrderedDict[frozenset[str], float] = OrderedDict()
        """Split -> its last ``keep_share`` (at most ``SubproblemCache.per_ue``, least recently set dropped)."""


class SubproblemCache:
    """ARA's per-UE subproblems (DESIGN.md §5, MJOA-MU's ARA: each UE re-planned at the share it is
    given), memoized across plans and each one's CPU time counted for its UE.

    A UE's subproblems are ``plan`` of its graph at a share and ``keep_share`` (the uplink share that keeps
    its split): pure functions of its graph (the same object), link, server state, policy and options, and
    the share. ``ara`` given a cache looks each up by exactly those inputs (no rounding: a hit returns what
    the solve would, so the shares are the ones ARA computes without the cache, up to a time-budgeted
    planner's own run-to-run variation) and solves on a miss, at most ``per_ue`` kept per UE (LRU). A UE
    whose graph object changed starts a fresh memo; UEs not in a plan are dropped from it.

    ``work_s``: thread CPU seconds per UE id spent on its subproblems (plans, ``keep_share``, its
    simulations) in the current ``ara`` call (reset at its start); a memo hit costs ~0. ``hits`` /
    ``misses``: memo lookups since creation. Not thread-safe (one planner at a time)."""

    def __init__(self, per_ue: int = SUBPROBLEM_MEMO) -> None:
        self.per_ue = int(per_ue)
        self._ues: dict[str, _UeMemo] = {}
        self.work_s: dict[str, float] = {}
        self.current: tuple[str, float] | None = None
        """(UE id, this thread's CPU time at its start) of the subproblem running now (None between them):
        the planner child's progress reports count it up to the moment they are sent."""
        self.hits = 0
        self.misses = 0

    def begin(self, problems: dict[str, UeProblem]) -> None:
        """Start of an ``ara`` call over ``problems``: reset ``work_s``, drop UEs gone and memos of a
        replaced graph."""
        self.work_s = {u: 0.0 for u in problems}
        for u in [u for u in self._ues if u not in problems]:
            del self._ues[u]
        for u, pb in problems.items():
            m = self._ues.get(u)
            if m is None or m.graph is not pb.graph:
                self._ues[u] = _UeMemo(pb.graph)

    def timed(self, ue: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` with its thread CPU time added to ``work_s[ue]``."""
        t = time.thread_time()
        outer = self.current is None
        if outer:
            self.current = (ue, t)
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.thread_time() - t
            if outer:
                self.current = None
            self.work_s[ue] = self.work_s.get(ue, 0.0) + dt

    def _memo(self, pb: UeProblem, key: tuple, solve):
        m = self._ues.get(pb.ue_id)
        if m is None or m.graph is not pb.graph:
            m = self._ues[pb.ue_id] = _UeMemo(pb.graph)
        full = (pb.link, _state_key(pb.state), pb.send_mbps, *key)
        got = m.solved.get(full)
        if got is not None:
            self.hits += 1
            m.solved.move_to_end(full)
            return got
        self.misses += 1
        got = self.timed(pb.ue_id, solve)
        m.solved[full] = got
        if len(m.solved) > self.per_ue:
            m.solved.popitem(last=False)
        return got

    def plan(self, pb: UeProblem, policy: str, share: Shares | None, opts: dict) -> Plan:
        """``plan(policy, pb.graph, pb.link, state=pb.state, share=share, **opts)``, memoized."""
        key = ("plan", policy, _opts_key(opts), share)
        return self._memo(pb, key, lambda: plan(policy, pb.graph, pb.link, state=pb.state, share=share, **opts))

    def keep_share(self, pb: UeProblem, p: Plan, policy: str, compute: float, opts: dict) -> float:
        """``keep_share(pb, p, policy=policy, compute=compute, **opts)``, memoized (and kept as the UE's
        last value for ``p``'s split, for ``stale_keep``)."""
        key = ("keep", policy, _opts_key(opts), p.server_ops, compute)
        v = self._memo(pb, key, lambda: keep_share(pb, p, policy=policy, compute=compute, **opts))
        lk = self._ues[pb.ue_id].last_keep
        lk[p.server_ops] = v
        lk.move_to_end(p.server_ops)
        if len(lk) > self.per_ue:  # (break44: it was unbounded, in a child outside --memory-mb)
            lk.popitem(last=False)
        return v

    def last_plan(self, ue: str, graph: CostGraph) -> Plan | None:
        """The plan ``ara`` last chose for ``ue`` with this graph object (None: none yet)."""
        m = self._ues.get(ue)
        return m.last_plan if m is not None and m.graph is graph else None

    def stale_keep(self, ue: str, server_ops: frozenset[str]) -> float | None:
        """The last ``keep_share`` of ``ue``'s split ``server_ops`` at any compute share (None: none)."""
        m = self._ues.get(ue)
        return None if m is None else m.last_keep.get(server_ops)

    def chose(self, plans: dict[str, Plan]) -> None:
        """End of an ``ara`` call: the plans it chose (each UE's last plan, for ``frozen`` UEs later)."""
        for u, p in plans.items():
            m = self._ues.get(u)
            if m is not None:
                m.last_plan = p


def _opts_key(opts: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in opts.items()))


def ara(problems: list[UeProblem], *, policy: str = "mjoa", max_rounds: int = 10,
        policy_options: dict | None = None, rules: tuple[str, ...] = UPLINK_RULES,
        cache: SubproblemCache | None = None, frozen: frozenset[str] | set[str] = frozenset()) -> Allocation:
    """MJOA-MU's ARA: alternate share allocation for fixed partitions (``allocate_epochs`` over
    ``rules``: uplink shares re-allocated at each upload completion, as the server does) with per-UE
    re-planning under the share each UE is given; accept only steps that lower sum w_n x simulated cold
    latency (each UE simulated at its effective uplink share, ``EpochAllocation.effective``). Published
    shares (``Allocation.shares``) are the first epoch's. Raises PartitionerError on duplicate ids.

    ``cache``: a ``SubproblemCache`` kept across calls (each UE's solves memoized by their exact inputs;
    default: a fresh one, for the accounting only); ``Allocation.work_s`` is each UE's subproblem CPU.
    ``frozen``: UEs not re-solved (the edge server: their owner's planner budget is in debt): a UE of it
    with a last plan in ``cache`` (same graph object) keeps that split (no re-planning at any share, its
    keep-share the last one computed for the split when the exact one is not memoized); the others are
    planned as usual. Listed in ``Allocation.stale``."""
    opts = dict(policy_options or {})
    if policy == "mjoa":
        opts.setdefault("budget_s", 0.2)
    pbs = {p.ue_id: p for p in problems}
    if len(pbs) != len(problems):
        raise PartitionerError("duplicate UE ids in allocation")
    if not pbs:
        return Allocation({}, {}, 0.0, ())
    c = SubproblemCache() if cache is None else cache
    c.begin(pbs)
    n = len(pbs)
    eq = Shares(1.0 / n, 1.0 / n)
    stale = {u for u in frozen if u in pbs and c.last_plan(u, pbs[u].graph) is not None}
    plans = {u: c.last_plan(u, p.graph) if u in stale else c.plan(p, policy, _capped(p, eq), opts)
             for u, p in pbs.items()}
    kept: dict[tuple, float] = {}

    def keep(u: str, p: Plan, phi: float) -> float:
        if u in stale:
            v = c.stale_keep(u, p.server_ops)
            if v is not None:
                return v
        return c.keep_share(pbs[u], p, policy, phi, opts)

    def shares_for(pl: dict[str, Plan]) -> tuple[dict[str, Shares | None], dict[str, Shares | None], str]:
        """(published first-epoch shares, effective shares for the simulator, the uplink rule chosen)."""
        dem = [c.timed(u, demand_of, u, pbs[u].graph, pbs[u].link, pl[u].server_ops, pbs[u].state, pbs[u].weight,
                       pbs[u].max_uplink) for u in pbs]
        phi = compute_shares(dem)
        floors = []
        for d in dem:
            key = (d.ue_id, pl[d.ue_id].server_ops, round(phi[d.ue_id], 3), pbs[d.ue_id].max_uplink)
            if key not in kept:
                kept[key] = keep(d.ue_id, pl[d.ue_id], phi[d.ue_id])
            floors.append(replace(d, min_uplink=kept[key]))
        ea = allocate_epochs(floors, rules)
        log.debug("uplink rule %s: %s", ea.rule, ea.objectives)

        def conv(tab: dict[str, float]) -> dict[str, Shares | None]:
            return {u: _to_shares(FixedAllocation(ea.compute, tab, 0.0), u) for u in pbs}

        return conv(ea.uplink), conv(ea.effective), ea.rule

    masks = {u: p.server_ops for u, p in plans.items()}
    sh, eff, best_rule = shares_for(plans)
    lat = _sim_latencies(pbs, masks, eff, c)
    j = _weighted(pbs, lat)
    hist = [j]
    for _ in range(max_rounds):
        improved = False
        for u, pb in pbs.items():
            if u in stale:  # its split is not re-solved (its owner's planner budget is in debt)
                continue
            # re-plan at the share the UE holds, and at the whole cell (what Smith's rule gives the UE it
            # puts first): from equal shares alone a crowded cell makes every UE's re-plan local, and the
            # search never reaches "one UE offloads with the cell, the others run locally"
            base = sh[u] or eq
            seen = {masks[u]}
            for trial_share in (_capped(pb, base), _capped(pb, Shares(base.compute, 1.0))):
                cand = c.plan(pb, policy, trial_share, opts)
                if cand.server_ops in seen:
                    continue
                seen.add(cand.server_ops)
                plans2 = {**plans, u: cand}
                masks2 = {**masks, u: cand.server_ops}
                sh2, eff2, rule2 = shares_for(plans2)
                lat2 = _sim_latencies(pbs, masks2, eff2, c)
                j2 = _weighted(pbs, lat2)
                if _lowers(pbs, lat, lat2):
                    plans, masks, sh, eff, j, lat = plans2, masks2, sh2, eff2, j2, lat2
                    best_rule = rule2
                    hist.append(j)
                    improved = True
                    break
        if not improved:
            break
    # report each plan under its published share
    final = {}
    for u, pb in pbs.items():
        final[u] = plans[u] if sh[u] is None else c.timed(u, _rescore, pb, plans[u], _capped(pb, sh[u]))
    c.chose(plans)
    return Allocation(sh, final, j, tuple(hist), best_rule, _sim_latencies(pbs, masks, eff, c), dict(c.work_s),
                      frozenset(stale))


def _rescore(pb: UeProblem, p: Plan, share: Shares) -> Plan:
    P = prepare(pb.graph)
    m = P.mask_of(p.server_ops)
    r = Rates.of(pb.link, share)
    return replace(p, cold_ms=run(P, m, r, "cold", pb.state).latency_ms,
                   warm_ms=run(P, m, r, "warm", pb.state).latency_ms,
                   details={**p.details, "share": share.to_dict()})


class Allocator:
    """Server-side allocation state: call on join, leave, or when a UE's upload finished."""

    def __init__(self, *, policy: str = "mjoa", max_rounds: int = 10, policy_options: dict | None = None,
                 planner=None):
        """``planner``: the function that runs ARA's search, called as ``planner(problems, policy=,
        max_rounds=, policy_options=)`` (and ``frozen=`` when ``frozen`` is set) with the list of
        :class:`UeProblem` and returning an
        :class:`Allocation` (default :func:`ara` in this process; the edge server passes one that runs it in
        a child process, ``edge_server.plan_process``). An exception it raises leaves ``allocation`` as it
        was (the change that caused the re-plan is kept in the state)."""
        self.policy = policy
        self.max_rounds = max_rounds
        self.policy_options = policy_options
        self.planner = ara if planner is None else planner
        self.cache = SubproblemCache()
        """The UEs' memoized subproblems when ``ara`` runs in this process (``planner`` None)."""
        self.frozen: frozenset[str] = frozenset()
        """UEs the next re-plans do not re-solve (``ara``'s ``frozen``; passed to ``planner`` as ``frozen=``
        when not empty): the caller sets it before a change."""
        self._ues: dict[str, UeProblem] = {}
        self.allocation = Allocation({}, {}, 0.0, ())

    def _recompute(self) -> Allocation:
        t = time.perf_counter()
        kw: dict = {"frozen": self.frozen} if self.frozen else {}
        if self.planner is ara:
            kw["cache"] = self.cache
        self.allocation = self.planner(list(self._ues.values()), policy=self.policy, max_rounds=self.max_rounds,
                                       policy_options=self.policy_options, **kw)
        a = self.allocation
        log.info("allocation for %d UEs: objective %.2f ms, uplink rule %s, uplink %s, predicted ms %s "
                 "(planned in %.0f ms)", len(self._ues), a.objective_ms, a.uplink_rule or "-",
                 {u[:8]: round(s.uplink, 3) for u, s in a.shares.items() if s is not None},
                 {u[:8]: round(v) for u, v in a.predicted_ms.items() if math.isfinite(v)},
                 (time.perf_counter() - t) * 1e3)
        return self.allocation

    def join(self, ue_id: str, graph: CostGraph, link: Link, *, weight: float = 1.0,
             state: ServerState | None = None, send_mbps: float = 0.0) -> Allocation:
        """A UE joins (``send_mbps``: its CPU-bound send rate, 0 unknown; ``UeProblem``)."""
        if ue_id in self._ues:
            raise PartitionerError(f"UE {ue_id!r} already joined")
        self._ues[ue_id] = UeProblem(ue_id, graph, link, weight, state, send_mbps)
        return self._recompute()

    def update(self, ue_id: str, graph: CostGraph, link: Link, *, weight: float, send_mbps: float) -> Allocation:
        """The UE sent a new profile (e.g. its send rate, measured after it joined): keep what the server
        holds for it, re-plan. Raises PartitionerError for a UE not allocated."""
        pb = self._ues.get(ue_id)
        if pb is None:
            raise PartitionerError(f"UE {ue_id!r} is not allocated")
        self._ues[ue_id] = UeProblem(ue_id, graph, link, weight, pb.state, send_mbps)
        return self._recompute()

    def __contains__(self, ue_id: object) -> bool:
        return ue_id in self._ues

    def held_size(self, but: str | None = None) -> int:
        """Ops + weights (``graph_size``) of the cost graphs of every UE held (but ``but``): what each
        re-plan plans."""
        return sum(graph_size(pb.graph) for u, pb in self._ues.items() if u != but)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Set UEs' weights w_n (e.g. a tenant's weight split over its sessions) without re-planning: the
        next join, leave, update or upload completion uses them. Unknown ids are ignored."""
        for u, w in weights.items():
            pb = self._ues.get(u)
            if pb is not None and pb.weight != w:
                self._ues[u] = replace(pb, weight=w)

    def forget(self, ue_id: str) -> None:
        """Drop ``ue_id`` from the state without re-planning (its join or update could not be planned: the
        next re-plan goes without it). Unknown ids are ignored."""
        self._ues.pop(ue_id, None)

    def replan(self) -> Allocation:
        """Plan the UEs held again as they are (after ``forget`` of some whose problems made a plan fail)."""
        return self._recompute()

    def leave(self, ue_id: str) -> Allocation:
        if self._ues.pop(ue_id, None) is None:
            raise PartitionerError(f"UE {ue_id!r} is not allocated")
        return self._recompute()

    def update_state(self, ue_id: str, state: ServerState) -> Allocation:
        pb = self._ues.get(ue_id)
        if pb is None:
            raise PartitionerError(f"UE {ue_id!r} is not allocated")
        self._ues[ue_id] = replace(pb, state=state)
        return self._recompute()

    def upload_finished(self, ue_id: str) -> Allocation:
        """The UE's weights are all on the server: it is warm from now on."""
        pb = self._ues.get(ue_id)
        if pb is None:
            raise PartitionerError(f"UE {ue_id!r} is not allocated")
        return self.update_state(ue_id, ServerState.warm(pb.graph))
