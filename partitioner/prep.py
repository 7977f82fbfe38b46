"""Index arrays of a CostGraph for hot loops (simulator, searches): no dict or networkx work per call.

Built once per graph object and cached in the instance ``__dict__`` (a frozen dataclass still has one).
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.costgraph import CostGraph

_KEY = "_partitioner_prepared"

SCALE_FREE: set[str] = set()
"""Keys of caches kept in a ``Prepared``'s ``__dict__`` that depend on the graph's structure and on its
costs only up to uniform UE and server factors: :func:`rescaled` carries them over to a scaled copy.
Modules caching such things on a ``Prepared`` add their key here (``partitioner.online``: its fingerprint
and table; ``ue_client.planning``: its name-set <-> bitmask memo)."""


@dataclass(frozen=True, eq=False)
class Prepared:
    graph: CostGraph
    n: int
    names: tuple[str, ...]
    a: tuple[float, ...]
    c: tuple[float, ...]
    d: tuple[int, ...]
    a_var: tuple[float, ...]
    c_var: tuple[float, ...]
    pinned: tuple[bool, ...]
    preds: tuple[tuple[int, ...], ...]
    succs: tuple[tuple[int, ...], ...]
    in_reads: tuple[tuple[str, ...], ...]
    """Graph inputs each op reads."""
    input_bytes: dict[str, int]
    op_weights: tuple[tuple[str, ...], ...]
    weight_bytes: dict[str, int]
    result_bytes: tuple[int, ...]
    """Bytes this op returns to the caller (its out_bytes if it is a graph output, else 0)."""
    desc: tuple[int, ...]
    """Bitmask of each op's descendants (including itself)."""
    anc: tuple[int, ...]
    """Bitmask of each op's ancestors (including itself)."""

    def mask_of(self, names) -> int:
        idx = self.graph.index
        m = 0
        for nm in names:
            m |= 1 << idx[nm]
        return m

    def names_of(self, mask: int) -> frozenset[str]:
        return frozenset(self.names[i] for i in range(self.n) if mask >> i & 1)


def prepare(graph: CostGraph) -> Prepared:
    got = graph.__dict__.get(_KEY)
    if got is not None:
        return got
    src = graph.__dict__.get("_scaled_from")
    if src is not None:  # a CostGraph.scaled copy: the base's arrays with the times scaled
        return rescaled(src[0], graph, src[1], src[2])
    ops = graph.ops
    n = len(ops)
    preds = graph.preds
    succs = graph.succs
    outs = set(graph.outputs)
    desc = [0] * n
    for i in range(n - 1, -1, -1):
        m = 1 << i
        for s in succs[i]:
            m |= desc[s]
        desc[i] = m
    anc = [0] * n
    for i in range(n):
        m = 1 << i
        for p in preds[i]:
            m |= anc[p]
        anc[i] = m
    p = Prepared(
        graph=graph, n=n, names=tuple(o.name for o in ops),
        a=tuple(float(o.ue_ms) for o in ops), c=tuple(float(o.server_ms) for o in ops),
        d=tuple(int(o.out_bytes) for o in ops),
        a_var=tuple(float(o.ue_var) for o in ops), c_var=tuple(float(o.server_var) for o in ops),
        pinned=tuple(not o.offloadable for o in ops), preds=preds, succs=succs,
        in_reads=tuple(tuple(s for s in o.inputs if s in graph.inputs) for o in ops),
        input_bytes=dict(graph.inputs), op_weights=tuple(tuple(o.weights) for o in ops),
        weight_bytes=dict(graph.weights),
        result_bytes=tuple(int(o.out_bytes) if o.name in outs else 0 for o in ops),
        desc=tuple(desc), anc=tuple(anc),
    )
    graph.__dict__[_KEY] = p
    return p


def rescaled(graph: CostGraph, scaled: CostGraph, ue: float, server: float) -> Prepared:
    """Give ``scaled`` (``graph`` with UE times x ``ue`` and server times x ``server``, the same structure:
    ``CostGraph.scaled``) its ``Prepared``, derived from ``graph``'s (prepared now if it was not, once per
    base graph): the structure's index arrays shared, the times and variances scaled, and the
    ``SCALE_FREE`` caches carried over (their state when the copy is first prepared)."""
    base = prepare(graph)
    p = Prepared(
        graph=scaled, n=base.n, names=base.names, a=tuple(map(ue.__mul__, base.a)),
        c=tuple(map(server.__mul__, base.c)), d=base.d,
        # (x * ue) * ue as the graph's ops (by ``map``: ~2x faster than a generator, session 30; the same floats)
        a_var=tuple(map(ue.__mul__, map(ue.__mul__, base.a_var))) if ue != 1.0 else base.a_var,
        c_var=tuple(map(server.__mul__, map(server.__mul__, base.c_var))) if server != 1.0 else base.c_var,
        pinned=base.pinned, preds=base.preds, succs=base.succs, in_reads=base.in_reads, input_bytes=base.input_bytes,
        op_weights=base.op_weights, weight_bytes=base.weight_bytes, result_bytes=base.result_bytes, desc=base.desc,
        anc=base.anc)
    for k in SCALE_FREE:
        v = base.__dict__.get(k)
        if v is not None:
            p.__dict__[k] = v
    scaled.__dict__[_KEY] = p
    return p
