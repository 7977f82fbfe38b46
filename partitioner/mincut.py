"""Min-cut on the additive warm model (DADS construction, DESIGN.md §5), with scipy's max-flow.

Source = UE, sink = server. Edge s->v costs c_v (+ its result bytes / R_dn) and is cut when v runs on
the server; v->t costs a_v and is cut when v stays on the UE; a source with several consumers gets an
auxiliary node so its tensor is paid once; every DAG edge u->v gets an infinite reverse edge v->u so
no server op feeds a UE op. Graph inputs and pinned ops are tied to the source. The round trip 2L is a
fixed cost of offloading anything, so the caller compares the best cut with local-only.

Capacities are floats scaled to int32 for scipy (total finite capacity -> 2^29): the cut found is
exact up to n * total / 2^29; callers re-score it with the float objective.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from partitioner.prep import Prepared
from partitioner.simulate import Rates, additive_warm_ms

_FINITE_TOTAL = float(2 ** 29)
_INF_CAP = 2 ** 30


class CutStructure:
    """The flow network of one graph, built once; ``solve`` fills capacities for a link and share."""

    def __init__(self, P: Prepared, weight_coef: float = 0.0) -> None:
        n = P.n
        self.n = n
        inputs = sorted(P.input_bytes)
        node = {i: 2 + i for i in range(n)}
        for j, x in enumerate(inputs):
            node[x] = 2 + n + j
        nxt = 2 + n + len(inputs)
        consumers: dict = {}
        for v in range(n):
            for p in P.preds[v]:
                consumers.setdefault(p, []).append(v)
            for x in P.in_reads[v]:
                consumers.setdefault(x, []).append(v)
        # edge (u, v) -> [a_coef, c_coef, up_coef(bytes), dn_coef(bytes), inf]
        edges: dict[tuple[int, int], list[float]] = {}

        def add(u: int, v: int, a=0.0, c=0.0, up=0.0, dn=0.0, inf=0) -> None:
            e = edges.setdefault((u, v), [0.0, 0.0, 0.0, 0.0, 0])
            e[0] += a
            e[1] += c
            e[2] += up
            e[3] += dn
            e[4] |= inf

        for v in range(n):
            wb = sum(P.weight_bytes[w] for w in P.op_weights[v]) * weight_coef
            if P.pinned[v]:
                add(0, node[v], inf=1)
            else:
                add(0, node[v], c=P.c[v], dn=P.result_bytes[v], up=wb)
            add(node[v], 1, a=P.a[v])
        for x in inputs:
            add(0, node[x], inf=1)
        for u, cons in consumers.items():
            b = P.d[u] if isinstance(u, int) else P.input_bytes[u]
            if len(cons) == 1:
                add(node[u], node[cons[0]], up=b)
            else:
                aux = nxt
                nxt += 1
                add(node[u], aux, up=b)
                for v in cons:
                    add(aux, node[v], inf=1)
            for v in cons:
                add(node[v], node[u], inf=1)
        self.n_nodes = nxt
        keys = sorted(edges)
        self.rows = np.array([k[0] for k in keys], dtype=np.int32)
        cols = np.array([k[1] for k in keys], dtype=np.int32)
        coef = np.array([edges[k] for k in keys], dtype=float).reshape(-1, 5)
        self.a_coef, self.c_coef, self.up_coef, self.dn_coef = coef[:, 0], coef[:, 1], coef[:, 2], coef[:, 3]
        self.inf = coef[:, 4] > 0
        self.indptr = np.searchsorted(self.rows, np.arange(nxt + 1)).astype(np.int32)
        self.indices = cols
        self.P = P

    def solve(self, r: Rates) -> int:
        """Server-op bitmask of a minimum cut (may be empty: everything local)."""
        return self.solve_weighted(1.0, 1.0 / r.phi, 1.0 / r.tup, 1.0 / r.dn)  # sent bytes: cut tensors

    def solve_weighted(self, wa: float, wc: float, wb: float, wd: float) -> int:
        """Minimum cut of wa * UE time + wc * server time + wb * sent bytes + wd * result bytes.

        ``solve(r)`` is (1, 1/phi, 1/R_up, 1/R_dn); cic's offline step probes other weights (any >= 0).
        """
        cap = wa * self.a_coef + wc * self.c_coef + wb * self.up_coef + wd * self.dn_coef
        cap[self.inf] = 0.0
        total = float(cap.sum())
        if total <= 0:
            return 0
        scale = _FINITE_TOTAL / total
        if scale < np.inf:
            icap = np.rint(cap * scale).astype(np.int32)
        else:  # a denormal sum (claimed costs ~1e-310): inf x 0 was NaN, cast to int32, and the cut flipped
            icap = np.rint(cap / total * _FINITE_TOTAL).astype(np.int32)
        icap[self.inf] = _INF_CAP
        shape = (self.n_nodes, self.n_nodes)
        g = sp.csr_matrix((icap, self.indices, self.indptr), shape=shape)
        flow = maximum_flow(g, 0, 1).flow
        res = (g - flow).tocsr()
        res.data = (res.data > 0).astype(np.int8)
        res.eliminate_zeros()
        reach = breadth_first_order(res, 0, directed=True, return_predecessors=False)
        ue = np.zeros(self.n_nodes, dtype=bool)
        ue[reach] = True
        m = 0
        for i in np.flatnonzero(~ue[2:2 + self.n]).tolist():
            m |= 1 << i
        return m


def dads(P: Prepared, r: Rates, structure: CutStructure | None = None) -> tuple[int, float]:
    """(server mask, additive warm cost) of the best cut, compared with local-only."""
    cs = structure or CutStructure(P)
    m = cs.solve(r)
    v = additive_warm_ms(P, m, r)
    local = sum(P.a)
    if local <= v:
        return 0, local
    return m, v
