"""`cic`: offline graph compression, then a tiny min-cut per decision (CIC, IJCNN 2022).

Compression contracts chain edges no optimal cut of the additive warm model uses, for ANY bandwidth:
in a chain segment u_1..u_m (each u_i's only consumer is u_{i+1}, whose only input is u_i; internal ops
not outputs) a cut after u_k costs b_k + d_k * x with x = 1/R, b_k = sum_{i<=k} a_i + sum_{i>k} c_i, and
the rest of the graph does not see where inside the segment the cut is. Cutting before u_1 or after u_m
costs at most b_0 + (bytes u_1 reads) x and b_m + d_m x. Internal cut positions that never reach the
lower envelope of these lines over x >= 0 are contracted. The envelope covers "a later cut never sends
fewer bytes" and "an op whose own cost and bytes make it always follow its neighbour". It depends only
on a, c, d (not on R, L, or what the server holds), so it is computed once per model and device pair
and cached; each online decision is a min-cut on the small graph with precomputed structure.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from partitioner.costgraph import CostGraph, OpCost
from partitioner.mincut import CutStructure
from partitioner.prep import Prepared, prepare
from partitioner.simulate import Rates, additive_warm_ms

log = logging.getLogger(__name__)

_CACHE: OrderedDict[str, Compressed] = OrderedDict()
_CACHE_MAX = 64


@dataclass(frozen=True, eq=False)
class Compressed:
    original: CostGraph
    graph: CostGraph
    """The compressed graph: one op per group, named after the group's last op."""
    groups: tuple[tuple[int, ...], ...]
    """Original op indices of each compressed op, in compressed-op order."""
    structure: CutStructure
    compress_ms: float

    @property
    def ratio(self) -> float:
        return len(self.original) / max(1, len(self.graph))

    @property
    def group_masks(self) -> tuple[int, ...]:
        got = self.__dict__.get("_gm")
        if got is None:
            got = tuple(sum(1 << i for i in g) for g in self.groups)
            self.__dict__["_gm"] = got
        return got

    def expand(self, cmask: int) -> int:
        gm = self.group_masks
        m = 0
        g = 0
        while cmask:
            if cmask & 1:
                m |= gm[g]
            cmask >>= 1
            g += 1
        return m

    def decide(self, r: Rates) -> tuple[int, float]:
        """(original server mask, additive cost): the online step, a min-cut on the compressed graph."""
        Q = prepare(self.graph)  # costs of merged ops are exact, so score on the small graph
        cm = self.structure.solve(r)
        v = additive_warm_ms(Q, cm, r)
        local = sum(Q.a)
        if local <= v:
            return 0, local
        return self.expand(cm), v


def _envelope(lines: list[tuple[float, float, int]]) -> set[int]:
    """Ids of lines (b, slope, id) that form the lower envelope of b + slope*x over x >= 0."""
    if not lines:
        return set()
    cur = min(lines, key=lambda t: (t[0], t[1]))
    keep = {cur[2]}
    x0 = 0.0
    while True:
        best = None
        for b, s, k in lines:
            if s < cur[1]:
                x = (b - cur[0]) / (cur[1] - s)
                if x < x0:
                    x = x0
                if best is None or x < best[0] or (x == best[0] and s < best[1][1]):
                    best = (x, (b, s, k))
        if best is None:
            return keep
        x0, cur = best[0], best[1]
        keep.add(cur[2])


def _chain_next(P: Prepared, outs: set[int]) -> list[int]:
    """nxt[u] = v when u->v is a chain edge, else -1."""
    nxt = [-1] * P.n
    for u in range(P.n):
        if len(P.succs[u]) == 1 and u not in outs:
            v = P.succs[u][0]
            if P.preds[v] == (u,) and not P.in_reads[v]:
                nxt[u] = v
    return nxt


def _fingerprint(g: CostGraph) -> str:
    h = hashlib.sha256()
    h.update(g.model_hash.encode())
    for op in g.ops:
        h.update(f"{op.name}|{','.join(op.inputs)}|{op.ue_ms!r}|{op.server_ms!r}|{op.out_bytes}|"
                 f"{op.offloadable}\n".encode())
    h.update(repr(sorted(g.inputs.items())).encode() + repr(g.outputs).encode())
    return h.hexdigest()


def compress(graph: CostGraph, *, use_cache: bool = True) -> Compressed:
    """Compress ``graph`` (cached by a fingerprint of structure and a, c, d)."""
    key = _fingerprint(graph)
    if use_cache and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    t0 = time.perf_counter()
    P = prepare(graph)
    outs = set(graph.output_ops)
    nxt = _chain_next(P, outs)
    has_prev = [False] * P.n
    for u in range(P.n):
        if nxt[u] >= 0:
            has_prev[nxt[u]] = True
    merge_next = [False] * P.n  # contract edge u -> nxt[u]
    for head in range(P.n):
        if has_prev[head] or nxt[head] < 0:
            continue
        seg = [head]
        while nxt[seg[-1]] >= 0:
            seg.append(nxt[seg[-1]])
        m = len(seg)
        a = [P.a[i] for i in seg]
        c = [P.c[i] for i in seg]
        pin_after = [False] * (m + 1)  # any pinned op among seg[k:]
        for k in range(m - 1, -1, -1):
            pin_after[k] = pin_after[k + 1] or P.pinned[seg[k]]
        pre = [0.0]
        for x in a:
            pre.append(pre[-1] + x)
        suf = [0.0] * (m + 1)
        for k in range(m - 1, -1, -1):
            suf[k] = suf[k + 1] + c[k]
        lines = []
        if not pin_after[0]:
            rb = sum(P.d[p] for p in P.preds[seg[0]]) + sum(P.input_bytes[x] for x in P.in_reads[seg[0]])
            lines.append((suf[0], float(rb), 0))
        last_out = P.d[seg[-1]] if P.succs[seg[-1]] else 0
        lines.append((pre[m], float(last_out), m))
        for k in range(1, m):
            if not pin_after[k]:
                lines.append((pre[k] + suf[k], float(P.d[seg[k - 1]]), k))
        keep = _envelope(lines)
        for k in range(1, m):
            if k not in keep:
                merge_next[seg[k - 1]] = True
    # groups: maximal runs of contracted edges
    group_of = [-1] * P.n
    groups: list[list[int]] = []
    for i in range(P.n):
        if group_of[i] >= 0:
            continue
        run = [i]
        while merge_next[run[-1]]:
            run.append(nxt[run[-1]])
        for j in run:
            group_of[j] = len(groups)
        groups.append(run)
    # groups in topological order of their first op: members are consecutive along a chain, and a
    # group's external inputs all come from its head, so ordering by head index is topological.
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    groups = [groups[g] for g in order]
    rep = {}
    for g in groups:
        for j in g:
            rep[P.names[j]] = P.names[g[-1]]
    ops = []
    for g in groups:
        head, last = graph.ops[g[0]], graph.ops[g[-1]]
        ws = tuple(dict.fromkeys(w for j in g for w in graph.ops[j].weights))
        ops.append(OpCost(
            name=last.name, inputs=tuple(dict.fromkeys(rep.get(s, s) for s in head.inputs)), weights=ws,
            out_bytes=last.out_bytes, ue_ms=sum(P.a[j] for j in g), server_ms=sum(P.c[j] for j in g),
            ue_var=sum(P.a_var[j] for j in g), server_var=sum(P.c_var[j] for j in g),
            layer=head.layer, offloadable=all(not P.pinned[j] for j in g)))
    small = CostGraph(ops=tuple(ops), inputs=graph.inputs, outputs=tuple(rep.get(o, o) for o in graph.outputs),
                      weights=graph.weights, model=graph.model, model_hash=graph.model_hash)
    # sort ops into a topological order (heads by index is topological; be safe anyway)
    cs = CutStructure(prepare(small))
    out = Compressed(original=graph, graph=small, groups=tuple(tuple(g) for g in groups), structure=cs,
                     compress_ms=(time.perf_counter() - t0) * 1e3)
    log.debug("cic: %s compressed %d -> %d ops in %.1f ms", graph.model, len(graph), len(small), out.compress_ms)
    if use_cache:
        _CACHE[key] = out
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return out
