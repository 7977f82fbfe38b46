"""`mjoa`: cold partitioning with parallel uploading (PBT-DP of MJOA-MU, DESIGN.md §5).

With weight uploads the objective is not a cut function, so the planner
1. seeds an incumbent cheaply: local-only, all-offloadable, min-cuts of the additive model with weight
   bytes charged to server ops at several prices and bandwidths (a parametric sweep), a sample of
   single splits of the topological order, then a local search of single-op moves at the cut frontier;
2. searches the tree of per-op UE/server decisions in topological order (an op may go to the UE only
   if all its predecessors did; a server op forces its descendants), scoring leaves with the simulator
   and pruning with a lower bound: max(decided UE time, for each decided server root j: earliest start
   of j (its UE inputs computed and sent, its weights sent, + L) + server time of j's descendants)
   + L + result bytes / R_dn. When the tree search finishes in the time budget the plan is exact.
The same search under warm costs gives the warm target that progressive offloading converges to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from partitioner.mincut import CutStructure
from partitioner.oracle import can_serve_mask
from partitioner.prep import Prepared
from partitioner.simulate import Rates, run
from partitioner.state import ServerState

_INF = float("inf")


@dataclass(frozen=True)
class SearchResult:
    mask: int
    value: float
    exact: bool
    leaves: int
    elapsed_ms: float


def _desc_sums(P: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """Server time and result bytes of each op's descendants (itself included), cached on P."""
    got = P.__dict__.get("_desc_sums")
    if got is not None:
        return got
    n = P.n
    nb = (n + 7) // 8
    c = np.array(P.c)
    res = np.array(P.result_bytes, dtype=float)
    cd = np.zeros(n)
    rd = np.zeros(n)
    for i in range(n):
        bits = np.unpackbits(np.frombuffer(P.desc[i].to_bytes(nb, "little"), dtype=np.uint8),
                             bitorder="little")[:n].astype(bool)
        cd[i] = c[bits].sum()
        rd[i] = res[bits].sum()
    P.__dict__["_desc_sums"] = (cd, rd)
    return cd, rd


def _score(P: Prepared, m: int, r: Rates, mode: str, state: ServerState | None) -> float:
    return run(P, m, r, mode, state).latency_ms


def heuristic(P: Prepared, r: Rates, mode: str, state: ServerState | None, budget_s: float,
              structures: dict | None = None) -> tuple[int, float]:
    """Best of a parametric min-cut sweep and sampled splits, polished by a frontier local search."""
    t0 = time.perf_counter()
    n = P.n
    ok = can_serve_mask(P)
    cands = {0, ok}
    structures = structures if structures is not None else {}
    lambdas = (0.0,) if mode == "warm" else (0.0, 0.25, 1.0, 4.0)
    for lam in lambdas:
        cs = structures.get(lam)
        if cs is None:
            cs = structures[lam] = CutStructure(P, weight_coef=lam)
        for mu in (0.25, 1.0, 4.0):
            cands.add(cs.solve(Rates(up=r.up * mu, dn=r.dn, L=r.L, phi=r.phi, tup=r.tup * mu)))
    full = (1 << n) - 1
    step = max(1, n // 64)
    for k in range(0, n + 1, step):
        s = full & ~((1 << k) - 1)
        if s & ~ok == 0:
            cands.add(s)
    best, best_v = 0, _INF
    for s in cands:
        v = _score(P, s, r, mode, state)
        if v < best_v:
            best, best_v = s, v
    # local search: move one frontier op across the cut, first improvement
    improved = True
    while improved and time.perf_counter() - t0 < budget_s:
        improved = False
        for i in range(n):
            bit = 1 << i
            if best & bit:  # server -> UE: all preds on the UE
                if P.anc[i] & ~bit & best:
                    continue
                s = best & ~bit
            else:  # UE -> server: all succs on the server, offloadable
                if not ok & bit or P.desc[i] & ~bit & ~best:
                    continue
                s = best | bit
            v = _score(P, s, r, mode, state)
            if v < best_v - 1e-9:
                best, best_v, improved = s, v, True
            if time.perf_counter() - t0 > budget_s:
                break
    return best, best_v


def tree_search(P: Prepared, r: Rates, mode: str, state: ServerState | None, budget_s: float,
                incumbent: tuple[int, float] | None = None) -> SearchResult:
    """Exact branch and bound over valid partitions; ``exact`` is False if the budget ran out."""
    t0 = time.perf_counter()
    n = P.n
    ok = can_serve_mask(P)
    cd, rd = _desc_sums(P)
    phi, up, L, dn = r.phi, r.up, r.L, r.dn
    tup = r.tup  # cut tensors' rate (``Rates.tup``): the bounds stay below the simulator's
    held = state.held if state is not None else frozenset()
    infl = state.in_flight if state is not None else {}
    own_w = [0.0] * n
    if mode != "warm":
        for i in range(n):
            own_w[i] = sum(infl.get(w, P.weight_bytes[w]) for w in P.op_weights[i] if w not in held) / up
    in_t = [sum(P.input_bytes[x] for x in P.in_reads[i]) / tup for i in range(n)]
    strict_anc = [P.anc[i] & ~(1 << i) for i in range(n)]
    best, best_v = incumbent if incumbent is not None else (0, _score(P, 0, r, mode, state))
    ue_fin = [0.0] * n
    leaves = 0
    nodes = 0
    # state: (i, server mask, UE time, server-bound (without final L + dn), result bytes bound)
    stack = [(0, 0, 0.0, 0.0, 0.0)]
    exact = True
    while stack:
        i, s, A, sb, rb = stack.pop()
        nodes += 1
        if nodes & 1023 == 0 and time.perf_counter() - t0 > budget_s:
            exact = False
            break
        while i < n and strict_anc[i] & s:
            s |= 1 << i
            i += 1
        lb = max(A, sb + L + rb / dn) if s else A
        if lb >= best_v - 1e-9:
            continue
        if i == n:
            if time.perf_counter() - t0 > budget_s:
                exact = False
                break
            leaves += 1
            v = _score(P, s, r, mode, state)
            if v < best_v - 1e-9:
                best, best_v = s, v
            continue
        if ok >> i & 1:  # server branch: i becomes a root of the server part
            st = in_t[i]
            for p in P.preds[i]:
                t = ue_fin[p] + P.d[p] / tup
                if t > st:
                    st = t
            if own_w[i] > st:
                st = own_w[i]
            sb2 = max(sb, st + L + cd[i] / phi)
            rb2 = max(rb, rd[i])
            if max(A, sb2 + L + rb2 / dn) < best_v - 1e-9:
                stack.append((i + 1, s | 1 << i, A, sb2, rb2))
        A2 = A + P.a[i]
        ue_fin[i] = A2
        stack.append((i + 1, s, A2, sb, rb))
    return SearchResult(best, best_v, exact, leaves, (time.perf_counter() - t0) * 1e3)


@dataclass(frozen=True)
class MjoaResult:
    cold: SearchResult
    warm: SearchResult


def mjoa(P: Prepared, r: Rates, state: ServerState | None = None, budget_s: float = 1.0,
         mode: str = "cold") -> MjoaResult:
    """Cold plan (``mode``: cold with parallel uploading, or serial) and warm target within ``budget_s``."""
    t0 = time.perf_counter()
    structures: dict = {}
    inc = heuristic(P, r, mode, state, budget_s * 0.25, structures)
    cold = tree_search(P, r, mode, state, budget_s * 0.6 - (time.perf_counter() - t0), inc)
    rest = budget_s - (time.perf_counter() - t0)
    winc = heuristic(P, r, "warm", None, max(0.0, rest * 0.3), structures)
    warm = tree_search(P, r, "warm", None, max(0.0, budget_s - (time.perf_counter() - t0)), winc)
    return MjoaResult(cold, warm)
