"""`optimal`: the exact oracle. Enumerates every valid partition (predecessor-closed UE set, pinned ops
on the UE) and scores it with the simulator, or solves the additive warm model as a MILP (HiGHS).

Used by tests and the benchmark to measure every other policy's optimality gap.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from partitioner.errors import PartitionerError, SearchSpaceTooLarge
from partitioner.prep import Prepared
from partitioner.simulate import Rates, additive_warm_ms, run
from partitioner.state import ServerState

OBJECTIVES = ("cold", "warm", "serial", "additive")


def can_serve_mask(P: Prepared) -> int:
    """Ops that may go to the server: offloadable with no pinned descendant."""
    pinned = 0
    for i in range(P.n):
        if P.pinned[i]:
            pinned |= 1 << i
    m = 0
    for i in range(P.n):
        if not P.desc[i] & pinned:
            m |= 1 << i
    return m


def partitions(P: Prepared, limit: int | None = None) -> Iterator[int]:
    """Every valid server set as a bitmask (successor-closed, no pinned op), local-only first."""
    n = P.n
    ok = can_serve_mask(P)
    strict_anc = [P.anc[i] & ~(1 << i) for i in range(n)]
    count = 0
    stack = [(0, 0)]
    while stack:
        i, s = stack.pop()
        while i < n and strict_anc[i] & s:
            s |= 1 << i  # forced: a predecessor is on the server
            i += 1
        if i == n:
            count += 1
            if limit is not None and count > limit:
                raise SearchSpaceTooLarge(f"more than {limit} valid partitions; use mjoa or raise the limit")
            yield s
            continue
        if ok >> i & 1:
            stack.append((i + 1, s | 1 << i))
        stack.append((i + 1, s))


def score(P: Prepared, smask: int, r: Rates, objective: str, state: ServerState | None) -> float:
    if objective == "additive":
        return additive_warm_ms(P, smask, r)
    return run(P, smask, r, objective, state).latency_ms


def optimal_enum(P: Prepared, r: Rates, objective: str = "cold", state: ServerState | None = None,
                 limit: int = 200_000, budget_s: float | None = None) -> tuple[int, float, int]:
    """(best server mask, its value, number of partitions scored). Ties keep the first (fewest offloaded
    in DFS order)."""
    if objective not in OBJECTIVES:
        raise PartitionerError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    t0 = time.perf_counter()
    best, best_v, k = 0, float("inf"), 0
    for s in partitions(P, limit):
        v = score(P, s, r, objective, state)
        k += 1
        if v < best_v - 1e-12:
            best, best_v = s, v
        if budget_s is not None and k % 256 == 0 and time.perf_counter() - t0 > budget_s:
            raise SearchSpaceTooLarge(f"optimal enumeration ran past its {budget_s:g} s budget after {k} "
                                      "partitions")
    return best, best_v, k


def optimal_milp(P: Prepared, r: Rates) -> tuple[int, float]:
    """Exact optimum of the additive warm model as a MILP (scipy HiGHS).

    x_v = 1 if op v is on the server; y_u = 1 if source u is sent; z = 1 if anything is offloaded.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = P.n
    srcs = list(range(n)) + sorted(P.input_bytes)
    sidx = {s: n + j for j, s in enumerate(srcs)}  # y variables
    zi = n + len(srcs)
    nv = zi + 1
    cost = np.zeros(nv)
    for v in range(n):
        cost[v] = P.c[v] / r.phi - P.a[v] + P.result_bytes[v] / r.dn
    for j, s in enumerate(srcs):
        b = P.d[s] if isinstance(s, int) else P.input_bytes[s]
        cost[n + j] = b / r.up
    cost[zi] = 2 * r.L
    rows, lo, hi = [], [], []

    def row(coefs: dict[int, float], lb: float, ub: float) -> None:
        vec = np.zeros(nv)
        for k, val in coefs.items():
            vec[k] += val
        rows.append(vec)
        lo.append(lb)
        hi.append(ub)

    for v in range(n):
        row({zi: 1, v: -1}, 0, np.inf)
        for p in P.preds[v]:
            row({v: 1, p: -1}, 0, np.inf)  # closure
            row({sidx[p]: 1, v: -1, p: 1}, 0, np.inf)  # sent if p on UE and v on server
        for inp in P.in_reads[v]:
            row({sidx[inp]: 1, v: -1}, 0, np.inf)
    ub = np.ones(nv)
    for v in range(n):
        if P.pinned[v]:
            ub[v] = 0
    cons = LinearConstraint(np.array(rows), lo, hi) if rows else None
    res = milp(cost, integrality=np.ones(nv), bounds=Bounds(np.zeros(nv), ub),
               constraints=cons if cons is not None else ())
    if not res.success:
        raise PartitionerError(f"MILP failed: {res.message}")
    m = 0
    for v in range(n):
        if res.x[v] > 0.5:
            m |= 1 << v
    return m, additive_warm_ms(P, m, r)
