"""`cic`: offline compression, then a tiny exact decision per request (CIC, IJCNN 2022; DESIGN.md §5).

The additive warm cost of a partition (server set S) is linear in four link/share numbers:

    cost(S) = A(S) + C(S) / phi + B(S) / R_up + D(S) / R_dn   (+ 2L when S is not empty)

with A the UE time of the UE ops, C the server time of the server ops, B the bytes sent up (each tensor
once), D the result bytes coming back. So every cut is a point v(S) = (A, C, B, D) >= 0 and a decision
is min over all valid S of v(S) . theta with theta = (1, 1/phi, 1/R_up, 1/R_dn) > 0 (then compare with
local-only, since 2L is a fixed cost of offloading anything). A cut can be optimal for some theta > 0
only if v(S) is a vertex of the "dominant" polyhedron Q = conv{v(S)} + R^4_+; every other cut is beaten
or tied by a vertex for every theta. The vertices depend only on the graph and on a, c, d (not on R_up,
R_dn, L, phi, or what the server holds), so they are computed once per model and device pair (cached
by a fingerprint of structure and costs) and each online decision is an argmin of K dot products
(K = number of vertices, a few to a few hundred on real graphs): microseconds, and exact.

Offline, two stages:

1. Structural contraction (exact for every theta): in a chain segment u_1..u_m (each u_i's only consumer
   is u_{i+1}, whose only input is u_i; internal ops not outputs) the cut position k costs
   (prefix UE time, suffix server time, bytes crossing, result bytes) . theta and the rest of the graph
   does not see where in the segment the cut is; cutting before u_1 / after u_m costs at most the same
   kind of point with the bytes u_1 reads / u_m's output. Positions whose point is not a vertex of the
   segment's dominant polyhedron are never needed: their chain edge is contracted. This covers "a later
   cut never sends fewer bytes" and "ops whose own cost and bytes make them always follow their
   neighbour" for all bandwidths and server shares at once.
2. Vertex enumeration by outer approximation (a multi-parameter Eisner-Severance / parametric min-cut):
   start from a few min-cuts; take the facets of the current dominant hull (qhull, 4-D; each facet is a
   normal theta_F >= 0 and a value h_F); run the exact min-cut at theta_F on the contracted graph; a
   cut below h_F is a new vertex, otherwise the facet is proved to be a facet of Q. When every facet is
   proved the hull equals Q, so min over its vertices = the min-cut for EVERY theta >= 0, including
   bandwidths, downlinks and shares never probed (the property tests check this against the
   enumeration oracle over grids of uplink, downlink, RTT and share). Boundary facets (some theta_F
   component 0) are probed too: they stand for the limits R -> inf, phi -> inf.

Why not a GGT nested parametric flow: bandwidth scales the internal (tensor) edges, not only source or
sink edges, so the optimal cuts over R are not nested in general, and phi and R_dn are parameters too;
the vertex set is what stays exact for all of them.

Budgets and fallbacks: the 4-D enumeration stops at ``budget_s`` / ``max_cuts`` (``complete=False``; seen
on dense random DAGs of >= 500 ops, whose cut polyhedron has thousands of vertices; every captured CNN
and ViT needs 2-6 vertices and 20-60 ms). Then the same enumeration runs on the 2-D slice of a fixed
compute share phi and uplink/downlink ratio, where cost = (A + C/phi) + (B + D R_up/R_dn) / R_up is a
one-parameter family in 1/R_up (the classic breakpoint enumeration): the default slice (phi = 1,
symmetric link) is computed offline, another slice on its first use (counted in that decision) and
cached. A slice that also runs out of budget falls back to the min-cut on the contracted graph (exact,
just not microseconds). Exactness is that of the min-cut oracle: scipy's max-flow takes integer
capacities, scaled as in DADS, so values agree with DADS and the enumeration oracle to ~1e-6 relative.

DADS, for comparison, builds its flow network and runs a max-flow on the full graph per decision; that
rebuild is part of what a DADS decision costs (the benchmark also reports max-flow-only times).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from partitioner.costgraph import CostGraph, OpCost
from partitioner.mincut import CutStructure
from partitioner.prep import Prepared, prepare
from partitioner.simulate import Rates, additive_terms, additive_warm_ms

log = logging.getLogger(__name__)

# Two explicit, bounded caches (LRU, ``_CACHE_MAX`` entries each, under one lock): by fingerprint (an equal
# graph built again reuses the work) and by graph object (the online decision skips the fingerprint). The
# second keeps the graph itself in its entry, so an id is never reused while it is cached.
_CACHE: OrderedDict[str, Compressed] = OrderedDict()
_BY_GRAPH: OrderedDict[int, tuple[CostGraph, Compressed]] = OrderedDict()
_CACHE_MAX = 64
_CACHE_LOCK = threading.Lock()
_DIM = 4


@dataclass(frozen=True, eq=False)
class Candidates:
    """Cuts proved to contain an optimal one for every parameter of their domain (when ``complete``)."""

    masks: tuple[int, ...]
    """Original-op server masks (the empty cut, all-local, may be one of them)."""
    vectors: np.ndarray
    """(A, C, B, D) of each mask: UE ms, server ms, sent bytes, result bytes."""
    complete: bool
    probes: int
    """Min-cuts run to find and prove them."""
    elapsed_ms: float = 0.0

    def __len__(self) -> int:
        return len(self.masks)


@dataclass(eq=False)
class Compressed:
    """A graph compressed for CIC decisions (module docstring): built once per (model, device) costs,
    then asked for a decision per link and share. Not frozen: it fills its own caches (the group masks,
    the local time, the per-slice candidate cuts) on first use; treat the fields as read-only."""

    original: CostGraph
    graph: CostGraph
    """The structurally contracted graph: one op per group, named after the group's last op."""
    groups: tuple[tuple[int, ...], ...]
    """Original op indices of each contracted op, in contracted-op order."""
    structure: CutStructure
    """Flow network of ``graph`` (the offline probes and the fallback decision)."""
    compress_ms: float
    cuts: Candidates | None = None
    """Vertex cuts over ALL links and shares (4-D); when incomplete, decisions use per-slice cuts."""
    slice_budget_s: float = 5.0
    slice_max_cuts: int = 2000
    _slices: OrderedDict[tuple[float, float], Candidates] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    """Candidate cuts of each (share, rate ratio) slice enumerated so far (the 32 most recent)."""

    @property
    def ratio(self) -> float:
        return len(self.original) / max(1, len(self.graph))

    @property
    def candidates(self) -> tuple[int, ...]:
        return self.cuts.masks if self.cuts is not None else ()

    @property
    def complete(self) -> bool:
        return self.cuts is not None and self.cuts.complete

    @cached_property
    def group_masks(self) -> tuple[int, ...]:
        """Original-op bitmask of each contracted op."""
        return tuple(sum(1 << i for i in g) for g in self.groups)

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

    def candidates_for(self, r: Rates) -> Candidates | None:
        """The proved candidate set that covers ``r``: the 4-D one, else the (share, rate ratio) slice
        (enumerated on first use and cached), else None."""
        if self.cuts is not None and self.cuts.complete:
            return self.cuts
        key = (r.phi, r.tup / r.dn)
        slices = self._slices
        got = slices.get(key)
        if got is None:
            got = slices[key] = self._enumerate(slice_proj(*key), self.slice_budget_s, self.slice_max_cuts)
            while len(slices) > 32:
                slices.popitem(last=False)
        return got if got.complete else None

    def decide(self, r: Rates) -> tuple[int, float]:
        """(original server mask, additive cost) of the best partition: the online step."""
        cand = self.candidates_for(r)
        if cand is None:
            return self.decide_mincut(r)
        V = cand.vectors
        vals = V[:, 0] + V[:, 1] * (1.0 / r.phi) + V[:, 2] * (1.0 / r.tup) + V[:, 3] * (1.0 / r.dn)
        j = int(vals.argmin())
        m = cand.masks[j]
        local = self.local_ms
        if not m:
            return 0, local
        v = float(vals[j]) + 2 * r.L
        if local <= v:
            return 0, local
        return m, v

    def decide_mincut(self, r: Rates) -> tuple[int, float]:
        """The fallback: a min-cut on the contracted graph with its prebuilt network."""
        Q = prepare(self.graph)  # costs of merged ops are exact, so score on the small graph
        cm = self.structure.solve(r)
        v = additive_warm_ms(Q, cm, r)
        local = sum(Q.a)
        if local <= v:
            return 0, local
        return self.expand(cm), v

    @cached_property
    def local_ms(self) -> float:
        """UE time of running everything locally (ms)."""
        return float(sum(prepare(self.original).a))

    def scaled(self, original: CostGraph, ue: float, server: float) -> Compressed:
        """This compression for ``original`` = ``self.original`` with UE times x ``ue`` and server times x
        ``server`` (``CostGraph.scaled``), for a complete 4-D candidate set only (else ``ValueError``).
        The vertices of the dominant polyhedron of the points (A, C, B, D) map to the vertices of the
        scaled points (ue A, server C, B, D) (a positive diagonal map keeps conv(U) + R^4_+'s vertices),
        and the chain contraction keeps positions by the same vertex test, so the masks are the same and
        only the vectors scale. ``structure`` stays the unscaled network: it serves only the fallback and
        slice enumerations, which a complete set never runs."""
        if not self.complete:
            raise ValueError("only a complete candidate set is scaled (slices depend on the share)")
        c = self.cuts
        cuts = Candidates(masks=c.masks, vectors=c.vectors * np.array([ue, server, 1.0, 1.0]), complete=True,
                          probes=c.probes, elapsed_ms=c.elapsed_ms)
        return Compressed(original=original, graph=self.graph.scaled(ue=ue, server=server), groups=self.groups,
                          structure=self.structure, compress_ms=self.compress_ms, cuts=cuts,
                          slice_budget_s=self.slice_budget_s, slice_max_cuts=self.slice_max_cuts)

    def _enumerate(self, proj: np.ndarray | None, budget_s: float, max_cuts: int) -> Candidates:
        t0 = time.perf_counter()
        found, complete, probes = enumerate_cuts(prepare(self.graph), self.structure, proj, budget_s=budget_s,
                                                 max_cuts=max_cuts)
        items = sorted(found.items(), key=lambda kv: kv[0])
        return Candidates(masks=tuple(self.expand(m) for _, m in items),
                          vectors=np.array([k for k, _ in items], dtype=float).reshape(-1, _DIM),
                          complete=complete, probes=probes, elapsed_ms=(time.perf_counter() - t0) * 1e3)


# ---- geometry ------------------------------------------------------------------------------------
def _raised(U: np.ndarray) -> np.ndarray:
    """U plus copies with every non-empty subset of coordinates raised to a common top: the dominant
    polyhedron conv(U) + R^d_+ cut by a box that keeps everything below the top."""
    d = U.shape[1]
    top = U.max(axis=0) * 2.0 + 1.0
    parts = [U]
    for k in range(1, d + 1):
        for T in itertools.combinations(range(d), k):
            R = U.copy()
            R[:, T] = top[list(T)]
            parts.append(R)
    return np.vstack(parts)


def dominant_hull(U: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Vertices (row indices of ``U``) of conv(U) + R^d_+, and its facets as (theta >= 0, h) with
    theta . x >= h on the polyhedron (theta normalised to sum 1). Raises QhullError on failure."""
    n = U.shape[0]
    pts = _raised(U)
    hull = ConvexHull(pts)
    verts = sorted(int(i) for i in hull.vertices if i < n)
    d = U.shape[1]
    nrm, off = hull.equations[:, :d], hull.equations[:, d]
    sel = (nrm <= 1e-12).all(axis=1) & (nrm < -1e-12).any(axis=1)
    theta = np.clip(-nrm[sel], 0.0, None)
    h = off[sel]
    s = theta.sum(axis=1)
    return verts, theta / s[:, None], h / s


def _segment_keep(points: list[tuple[float, ...]], ids: list[int]) -> set[int]:
    """Ids of the points that are vertices of their dominant polyhedron (ties keep one)."""
    if len(points) <= 2:
        return set(ids)
    U = np.array(points, dtype=float)
    scale = np.abs(U).max(axis=0)
    scale[scale == 0] = 1.0
    U = U / scale
    uniq, first = np.unique(U, axis=0, return_index=True)
    try:
        verts, _, _ = dominant_hull(uniq)
    except (QhullError, ValueError):
        return set(ids)
    return {ids[int(first[v])] for v in verts}


# ---- stage 1: structural contraction --------------------------------------------------------------
def _chain_next(P: Prepared, outs: set[int]) -> list[int]:
    """nxt[u] = v when u->v is a chain edge, else -1."""
    nxt = [-1] * P.n
    for u in range(P.n):
        if len(P.succs[u]) == 1 and u not in outs:
            v = P.succs[u][0]
            if P.preds[v] == (u,) and not P.in_reads[v]:
                nxt[u] = v
    return nxt


def contract(graph: CostGraph) -> tuple[CostGraph, list[list[int]]]:
    """The chain-contracted graph and its groups (original op indices), exact for every link/share."""
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
        pin_after = [False] * (m + 1)  # any pinned op among seg[k:]
        for k in range(m - 1, -1, -1):
            pin_after[k] = pin_after[k + 1] or P.pinned[seg[k]]
        pre = [0.0]
        for i in seg:
            pre.append(pre[-1] + P.a[i])
        suf = [0.0] * (m + 1)
        for k in range(m - 1, -1, -1):
            suf[k] = suf[k + 1] + P.c[seg[k]]
        res = float(P.result_bytes[seg[-1]])
        # point of cut position k (first k ops on the UE): (UE time, server time, bytes up, result bytes)
        pts, ids = [], []
        if not pin_after[0]:
            rb = sum(P.d[p] for p in P.preds[seg[0]]) + sum(P.input_bytes[x] for x in P.in_reads[seg[0]])
            pts.append((pre[0], suf[0], float(rb), res))
            ids.append(0)
        last_out = P.d[seg[-1]] if P.succs[seg[-1]] else 0
        pts.append((pre[m], 0.0, float(last_out), 0.0))
        ids.append(m)
        for k in range(1, m):
            if not pin_after[k]:
                pts.append((pre[k], suf[k], float(P.d[seg[k - 1]]), res))
                ids.append(k)
        keep = _segment_keep(pts, ids)
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
    # members are consecutive along a chain and a group's external inputs all come from its head, so
    # ordering groups by head index is topological.
    groups.sort(key=lambda g: g[0])
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
    return small, groups


# ---- stage 2: vertex enumeration ------------------------------------------------------------------
def cut_vector(P: Prepared, smask: int) -> tuple[float, float, float, float]:
    """(UE ms, server ms, sent bytes, result bytes) of a server set under the additive warm model."""
    return additive_terms(P, smask)


def _direction(lam: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``lam / scale`` (k-vectors, ``lam`` >= 0, ``scale`` > 0) times a positive factor that brings its
    largest entry to 1: the min-cut at a weight vector does not depend on such a factor, and it stays
    finite when ``scale`` holds a denormal (claimed costs summing to ~1e-310, in range: ``lam / scale``
    overflowed to inf, inf x 0 made NaN weights, and probes returned wrong cuts, losing a vertex)."""
    out = np.zeros(len(lam))
    pos = lam > 0
    if pos.any():
        lg = np.log(lam[pos]) - np.log(scale[pos])
        out[pos] = np.exp(lg - lg.max())
    return out


def enumerate_cuts(Q: Prepared, cs: CutStructure, proj: np.ndarray | None = None, *, budget_s: float = 5.0,
                   max_cuts: int = 2000) -> tuple[dict[tuple[float, ...], int], bool, int]:
    """Vertex cuts of the dominant polyhedron of ``Q``'s cut vectors: ({(A, C, B, D): server mask},
    complete, number of min-cuts run). See the module docstring.

    ``proj`` (k x 4, default the identity) restricts the parameters to theta = proj^T lambda, lambda >= 0:
    the vertices are then those of the projected points proj v(S) (a slice of the parameter space).
    """
    t0 = time.perf_counter()
    M = np.eye(_DIM) if proj is None else np.asarray(proj, dtype=float)
    k = M.shape[0]
    full = np.array([sum(Q.a), sum(Q.c), float(sum(Q.d) + sum(Q.input_bytes.values())),
                     float(sum(Q.result_bytes))])
    scale = M @ full
    scale[scale <= 0] = 1.0
    found: dict[tuple[float, ...], int] = {}
    probes = 0

    def probe(lam: np.ndarray) -> tuple[float, ...]:
        nonlocal probes
        probes += 1
        w = M.T @ _direction(lam, scale)
        m = cs.solve_weighted(float(w[0]), float(w[1]), float(w[2]), float(w[3]))
        v = cut_vector(Q, m)
        found.setdefault(v, m)
        return v

    seeds = [np.ones(k)] + [np.eye(k)[i] for i in range(k)]
    for x in (0.01, 0.1, 10.0, 100.0):
        th = np.ones(k)
        th[k // 2:] = x
        seeds.append(th)
    for th in seeds:
        probe(th)
    verified: set[tuple] = set()
    while True:
        keys = list(found)
        W = (np.array(keys, dtype=float) @ M.T) / scale
        W, first = np.unique(W, axis=0, return_index=True)
        try:
            verts, thetas, hs = dominant_hull(W)
        except (QhullError, ValueError) as e:
            log.warning("cic: qhull failed (%s); candidates incomplete", e)
            return found, False, probes
        found = {keys[int(first[i])]: found[keys[int(first[i])]] for i in verts}
        new = 0
        for th, h in zip(thetas, hs, strict=True):
            key = (tuple(np.round(th, 9)), round(float(h), 9))
            if key in verified:
                continue
            if time.perf_counter() - t0 > budget_s or len(found) > max_cuts:
                return found, False, probes
            before = len(found)
            v = probe(th)
            val = float(np.dot((M @ np.array(v)) / scale, th))
            if val < h - 1e-9 * max(1.0, abs(h)) and len(found) > before:
                new += 1
            else:
                verified.add(key)
        if not new:
            return found, True, probes


def slice_proj(phi: float, ratio: float) -> np.ndarray:
    """The 2-D slice of a fixed compute share ``phi`` and uplink/downlink rate ratio: cost =
    (A + C/phi) + (B + ratio * D) / R_up."""
    return np.array([[1.0, 1.0 / phi, 0.0, 0.0], [0.0, 0.0, 1.0, ratio]])


def _fingerprint(g: CostGraph) -> str:
    h = hashlib.sha256()
    h.update(g.model_hash.encode())
    for op in g.ops:
        h.update(f"{op.name}|{','.join(op.inputs)}|{op.ue_ms!r}|{op.server_ms!r}|{op.out_bytes}|"
                 f"{op.offloadable}\n".encode())
    h.update(repr(sorted(g.inputs.items())).encode() + repr(g.outputs).encode())
    return h.hexdigest()


def cached(graph: CostGraph) -> Compressed | None:
    """The compression of ``graph`` if it was computed before (on this object, or on an equal graph)."""
    with _CACHE_LOCK:
        hit = _BY_GRAPH.get(id(graph))
        if hit is not None and hit[0] is graph:
            _BY_GRAPH.move_to_end(id(graph))
            return hit[1]
    key = _fingerprint(graph)
    with _CACHE_LOCK:
        got = _CACHE.get(key)
        if got is not None:
            _CACHE.move_to_end(key)
            _remember(graph, key, got)
    return got


def _remember(graph: CostGraph, key: str, comp: Compressed) -> None:
    """Put ``comp`` in both caches (caller holds ``_CACHE_LOCK``), dropping the least recently used."""
    _CACHE[key] = comp
    _BY_GRAPH[id(graph)] = (graph, comp)
    _BY_GRAPH.move_to_end(id(graph))
    for cache in (_CACHE, _BY_GRAPH):
        while len(cache) > _CACHE_MAX:
            cache.popitem(last=False)


def compress(graph: CostGraph, *, use_cache: bool = True, budget_s: float = 5.0, max_cuts: int = 2000,
             slice_max_cuts: int = 2000) -> Compressed:
    """Compress ``graph`` (cached by a fingerprint of structure and a, c, d).

    ``budget_s`` / ``max_cuts`` bound the 4-D vertex enumeration; past them the result covers the
    default slice (full share, symmetric link) and enumerates other slices on first use (each bounded
    by ``budget_s`` / ``slice_max_cuts``; past those, decisions are min-cuts on the contracted graph).
    """
    if use_cache:
        got = cached(graph)
        if got is not None:
            return got
        src = graph.scaled_from()
        if src is not None:  # a calibrated copy (CostGraph.scaled): its base's compression, scaled, when complete
            base = compress(src[0], budget_s=budget_s, max_cuts=max_cuts, slice_max_cuts=slice_max_cuts)
            if base.complete:  # (a compression per moved scale: resnet18's cic re-plan 17 ms median)
                got = base.scaled(graph, src[1], src[2])
                with _CACHE_LOCK:
                    _BY_GRAPH[id(graph)] = (graph, got)
                    _BY_GRAPH.move_to_end(id(graph))
                    while len(_BY_GRAPH) > _CACHE_MAX:
                        _BY_GRAPH.popitem(last=False)
                return got
    key = _fingerprint(graph)
    t0 = time.perf_counter()
    small, groups = contract(graph)
    shell = Compressed(original=graph, graph=small, groups=tuple(tuple(g) for g in groups),
                       structure=CutStructure(prepare(small)), compress_ms=0.0)
    cuts = shell._enumerate(None, budget_s, max_cuts)
    out = Compressed(original=graph, graph=small, groups=shell.groups, structure=shell.structure,
                     compress_ms=0.0, cuts=cuts, slice_budget_s=budget_s, slice_max_cuts=slice_max_cuts)
    if not cuts.complete:
        out.candidates_for(Rates(up=1.0, dn=1.0, L=0.0, phi=1.0))  # the default slice, offline too
    out.compress_ms = (time.perf_counter() - t0) * 1e3
    log.debug("cic: %s %d ops -> %d contracted, %d candidate cuts (%s, %d probes) in %.1f ms", graph.model,
              len(graph), len(small), len(cuts), "complete" if cuts.complete else "incomplete: per slice",
              cuts.probes, out.compress_ms)
    if use_cache:
        with _CACHE_LOCK:
            _remember(graph, key, out)
    return out
