"""Every planner behind one entry point: ``plan(policy, graph, link, ...) -> Plan``.

Each policy computes a server set with its own model; ``plan`` then scores it with the one simulator
(``cold_ms`` with what the server holds, ``warm_ms`` with everything held) so plans compare on one ruler:
``predicted_ms`` is ``cold_ms`` for every policy (what the runtime will do), the policy's own objective is
``details["objective_ms"]``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from partitioner import ionn
from partitioner.compress import cached as cached_compression
from partitioner.compress import compress
from partitioner.costgraph import CostGraph, CostGraphError, Link
from partitioner.errors import PartitionerError, UnknownPolicyError
from partitioner.mincut import dads as _dads
from partitioner.mjoa import mjoa as _mjoa
from partitioner.oracle import can_serve_mask, optimal_enum, optimal_milp
from partitioner.plan import Plan
from partitioner.prep import Prepared, prepare
from partitioner.robust import EnergyModel
from partitioner.robust import robust as _robust
from partitioner.simulate import Rates, run, split_costs
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What a policy function returns before ``plan`` scores it."""

    mask: int
    predicted_ms: float
    feasible: bool = True
    reason: str = ""
    exact: bool | None = None
    warm_target: int | None = None
    frequency_ghz: float | None = None
    energy_mj: float | None = None
    ue_time_factor: float = 1.0
    decision_ms: float | None = None
    """Set by policies whose decision excludes an offline step (cic's compression)."""
    details: dict | None = None


PolicyFn = Callable[..., Decision]


def _local(P: Prepared, r: Rates, state: ServerState | None) -> Decision:
    return Decision(0, sum(P.a))


def _offload(P: Prepared, r: Rates, state: ServerState | None) -> Decision:
    """Everything the server may run goes there; weights uploaded first (serial), then inference."""
    m = can_serve_mask(P)
    pinned = [P.names[i] for i in range(P.n) if not m >> i & 1]
    det = {"kept_on_ue": pinned} if pinned else {}
    return Decision(m, run(P, m, r, "serial", state).latency_ms, details=det)


def _neurosurgeon(P: Prepared, r: Rates, state: ServerState | None) -> Decision:
    ok = can_serve_mask(P)
    full = (1 << P.n) - 1
    best_k, best_v = P.n, math.inf
    for k, v in enumerate(split_costs(P, r)):
        s = full & ~((1 << k) - 1)
        if s & ~ok == 0 and v < best_v:
            best_k, best_v = k, v
    return Decision(full & ~((1 << best_k) - 1), best_v, details={"split_after": best_k})


def _dads_policy(P: Prepared, r: Rates, state: ServerState | None) -> Decision:
    m, v = _dads(P, r)
    return Decision(m, v)


def _cic(P: Prepared, r: Rates, state: ServerState | None) -> Decision:
    """Argmin over the offline candidate cuts. The decision time counts the cache lookup and the
    decision; the offline compression (first use of a graph) is reported as ``compress_ms`` instead,
    and a (share, link ratio) slice enumerated on first use (graphs whose 4-D enumeration did not
    finish) is counted in the decision that needed it."""
    t0 = time.perf_counter()
    comp = cached_compression(P.graph)
    fresh = comp is None
    if comp is None:
        comp = compress(P.graph)
        t0 = time.perf_counter()
    n_slices = len(comp.__dict__.get("_slices", ()))
    m, v = comp.decide(r)
    dt = (time.perf_counter() - t0) * 1e3
    cand = comp.candidates_for(r)
    det = {"compressed_ops": len(comp.graph), "compress_ms": comp.compress_ms, "compressed_now": fresh,
           "candidate_cuts": None if cand is None else len(cand),
           "scope": "all links and shares" if comp.complete else ("link-ratio/share slice" if cand is not None
                                                                  else "min-cut on the contracted graph")}
    if len(comp.__dict__.get("_slices", ())) != n_slices:
        det["slice_enumerated_now"] = True
    return Decision(m, v, decision_ms=dt, details=det)


def _mjoa_policy(P: Prepared, r: Rates, state: ServerState | None, *, budget_s: float = 1.0,
                 mode: str = "cold") -> Decision:
    if mode not in ("cold", "serial"):
        raise PartitionerError(f"mjoa mode must be 'cold' or 'serial', got {mode!r}")
    res = _mjoa(P, r, state, budget_s=budget_s, mode=mode)
    return Decision(res.cold.mask, res.cold.value, exact=res.cold.exact, warm_target=res.warm.mask,
                    details={"leaves": res.cold.leaves, "warm_target_ms": res.warm.value,
                             "warm_target_exact": res.warm.exact})


def _robust_policy(P: Prepared, r: Rates, state: ServerState | None, *, deadline_ms: float | None = None,
                   eps: float = 0.05, energy: EnergyModel | None = None, quantile: str = "cantelli",
                   mode: str = "cold", max_enum: int = 4096, budget_s: float = 1.0,
                   uplink_cv: float = 0.0, ue_cpu: UeCpu | None = None, ue_cv: float = 0.0,
                   fixed_ms: float = 0.0, transport_ms: float = 0.0, transport_sd_ms: float = 0.0) -> Decision:
    if deadline_ms is None:
        raise PartitionerError("policy 'robust' needs deadline_ms=... (the latency deadline D in ms)")
    res = _robust(P, r, state, deadline_ms=deadline_ms, eps=eps, energy=energy, quantile=quantile,
                  mode=mode, max_enum=max_enum, budget_s=budget_s, uplink_cv=uplink_cv,
                  ue_cpu=ue_cpu, ue_cv=ue_cv, fixed_ms=fixed_ms, transport_ms=transport_ms,
                  transport_sd_ms=transport_sd_ms)
    em = energy or EnergyModel()
    return Decision(res.mask, res.quantile_ms, feasible=res.feasible, reason=res.reason, exact=res.exact,
                    frequency_ghz=res.freq_ghz, energy_mj=res.energy_mj,
                    ue_time_factor=em.time_factor(res.freq_ghz),
                    details={"mean_ms": res.mean_ms, "std_ms": res.std_ms, "k": res.k, "eps": eps,
                             "deadline_ms": deadline_ms, "quantile": quantile, "candidates": res.candidates,
                             "evaluated": res.evaluated, "budget_s": budget_s,
                             "uplink_cv": uplink_cv, "ue_cv": ue_cv, "ue_overhead_ms": fixed_ms,
                             "transport_ms": transport_ms, "transport_sd_ms": transport_sd_ms,
                             "miss_bound": res.miss_bound, **res.parts})


def _ionn(P: Prepared, r: Rates, state: ServerState | None) -> Decision:
    """IONN: the best warm split among the suffixes the server holds; the rest goes up in pieces by gain
    per byte (``partitioner.ionn``). ``details['background']``: the pieces' weights still to upload."""
    st = ionn.step(P, r, state)
    return Decision(st.mask, st.warm_ms, warm_target=st.target,
                    details={**st.details, "background": list(st.background)})


def _optimal(P: Prepared, r: Rates, state: ServerState | None, *, objective: str = "cold",
             method: str = "enum", limit: int = 200_000, budget_s: float | None = None) -> Decision:
    if method == "milp":
        if objective != "additive":
            raise PartitionerError("optimal method='milp' solves the additive warm model: use objective='additive'")
        m, v = optimal_milp(P, r)
        return Decision(m, v, exact=True, details={"objective": objective, "method": method})
    if method != "enum":
        raise PartitionerError(f"optimal method must be 'enum' or 'milp', got {method!r}")
    m, v, k = optimal_enum(P, r, objective, state, limit=limit, budget_s=budget_s)
    return Decision(m, v, exact=True, details={"objective": objective, "method": method, "partitions": k})


POLICIES: dict[str, PolicyFn] = {
    "local": _local,
    "offload": _offload,
    "neurosurgeon": _neurosurgeon,
    "dads": _dads_policy,
    "cic": _cic,
    "mjoa": _mjoa_policy,
    "robust": _robust_policy,
    "optimal": _optimal,
    "ionn": _ionn,
}


def _check_finite(P: Prepared) -> None:
    """CostGraphError where an op's time or variance is not finite; once per prepared graph (its arrays are
    tuples: a checked one stays valid; session 17: the loop was ~0.1-0.3 ms of every IONN re-plan)."""
    if P.__dict__.get("_finite_checked"):
        return
    if all(map(math.isfinite, P.a)) and all(map(math.isfinite, P.c)) and all(map(math.isfinite, P.a_var)) \
            and all(map(math.isfinite, P.c_var)):
        P.__dict__["_finite_checked"] = True
        return
    for i in range(P.n):
        for label, v in (("ue_ms", P.a[i]), ("server_ms", P.c[i]), ("ue_var", P.a_var[i]),
                         ("server_var", P.c_var[i])):
            if not math.isfinite(v):
                raise CostGraphError(f"op {P.names[i]!r} has non-finite {label}={v!r}")


def plan(policy: str, graph: CostGraph, link: Link, *, state: ServerState | None = None,
         share: Shares | None = None, table: Any = None, **policy_options: Any) -> Plan:
    """Run one policy and score its partition with the simulator.

    ``state``: what the server holds (default: nothing, the cold start). ``share``: this UE's share of
    server compute and uplink. ``table``: a ``partitioner.online.OnlineTable`` of ``graph`` (e.g.
    ``online.predictor``) to score the partition with its compiled evaluation instead of the simulator: the
    same numbers to float rounding, O(uplink items) instead of O(ops + weights) (None: the simulator).
    Raises UnknownPolicyError, CostGraphError (bad graph or link) or PartitionerError (bad options, search
    space too large for ``optimal``); an infeasible deadline is a Plan with ``feasible=False`` and its
    ``reason``.
    """
    fn = POLICIES.get(policy)
    if fn is None:
        raise UnknownPolicyError(policy, list(POLICIES))
    if not isinstance(link, Link):
        raise CostGraphError(f"link must be a Link, got {type(link).__name__}")
    P = prepare(graph)
    _check_finite(P)
    r = Rates.of(link, share)
    t0 = time.perf_counter()
    try:
        dec = fn(P, r, state, **policy_options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise PartitionerError(f"policy {policy!r}: {e}") from e
        raise
    dt = (time.perf_counter() - t0) * 1e3 if dec.decision_ms is None else dec.decision_ms
    return make_plan(policy, P, r, state, dec, dt, table=table)


def make_plan(policy: str, P: Prepared, r: Rates, state: ServerState | None, dec: Decision,
              decision_ms: float, *, table: Any = None) -> Plan:
    """The ``Plan`` of decision ``dec`` on ``P``, its predictions the simulator's (:func:`partitioner.simulate.run`,
    cold and warm), or ``table``'s compiled evaluation of the same partition where a table is given and the
    decision runs the UE at the profile's frequency (``OnlineTable.predict``: the same numbers to float rounding;
    the policy's mask is taken as valid, as the policies make it)."""
    a = None if dec.ue_time_factor == 1.0 else [x * dec.ue_time_factor for x in P.a]
    if table is not None and a is None:
        cold = table.predict(P, dec.mask, r, "cold", state)
        warm = table.predict(P, dec.mask, r, "warm", state, order=False)
    else:
        cold = run(P, dec.mask, r, "cold", state, a=a)
        warm = run(P, dec.mask, r, "warm", state, a=a)
    det = dict(dec.details or {})
    det["objective_ms"] = dec.predicted_ms
    if a is not None:
        det["ue_time_factor"] = dec.ue_time_factor
    # One ruler: the prediction is the simulator's for what the runtime does with this partition (parallel
    # need-ordered upload of what the server lacks), whatever the policy optimised; the policy's own
    # objective (additive warm cost, serial latency, a quantile) stays in details["objective_ms"].
    return Plan(
        policy=policy, server_ops=P.names_of(dec.mask), predicted_ms=cold.latency_ms, cold_ms=cold.latency_ms,
        warm_ms=warm.latency_ms, decision_ms=decision_ms, upload_bytes=cold.upload_bytes,
        sent_tensor_bytes=cold.sent_tensor_bytes, upload_order=cold.upload_order, feasible=dec.feasible,
        reason=dec.reason, exact=dec.exact,
        warm_target=None if dec.warm_target is None else P.names_of(dec.warm_target),
        frequency_ghz=dec.frequency_ghz, energy_mj=dec.energy_mj, details=det)
