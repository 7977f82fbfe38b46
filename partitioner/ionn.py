"""IONN (incremental offloading of neural networks, SoCC 2018) as a policy: the baseline that uploads a
model in pieces across queries.

The model is cut only at single splits of the topological order (UE = the first k ops, server = the
suffix; a suffix of a topological order is closed under successors, so every one is a valid split). The
upload schedule is fixed once per link: greedily, the next piece is the op range (k, h] whose upload
buys the most warm-latency gain per byte, given the pieces already scheduled (h = where the previous
piece began). Each query runs the best warm split among the suffixes whose weights the server already
holds, so nothing is ever uploaded on a query's critical path; the schedule's remaining pieces go up
in the background, behind the query's own traffic. IONN does not model the UE's CPU cost of sending:
its background uploads run whatever the UE computes meanwhile (faithful to the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.prep import Prepared
from partitioner.simulate import Rates, split_costs
from partitioner.state import ServerState


@dataclass(frozen=True)
class IonnSchedule:
    batches: tuple[tuple[str, ...], ...]
    """Weight names per upload piece, in upload order (each piece from its last op back to its first)."""
    split_ms: tuple[float, ...]
    """Additive warm latency of split k (UE = first k ops), k = 0..n."""
    valid: tuple[bool, ...]
    """Split k is allowed (every op of the suffix may run on the server)."""
    best_from: tuple[int, ...] = ()
    """For h = 0..n, the split k >= h of least ``split_ms`` (the first of equals): a query whose held suffix
    begins at h runs it (``step``: a lookup instead of a scan per query)."""
    target_k: int = 0
    """The valid split of least ``split_ms`` (the first of equals): the warm target."""


_CACHE = "_ionn_schedules"


def schedule(P: Prepared, r: Rates) -> IonnSchedule:
    """The upload schedule for this graph and link (cached on the graph: one per link)."""
    cache = P.graph.__dict__.setdefault(_CACHE, {})
    key = (r.up, r.dn, r.L, r.phi, r.tup)
    got = cache.get(key)
    if got is None:
        if len(cache) >= 8:
            cache.pop(next(iter(cache)))
        got = cache[key] = _schedule(P, r)
    return got


def _schedule(P: Prepared, r: Rates) -> IonnSchedule:
    n = P.n
    T = split_costs(P, r)
    valid = [True] * (n + 1)  # split k is valid while no op of its suffix is pinned to the UE
    for k in range(n - 1, -1, -1):
        valid[k] = valid[k + 1] and not P.pinned[k]
    suffix_best = [T[n]] * (n + 1)
    best = T[n]
    for k in range(n, -1, -1):
        if valid[k]:
            best = min(best, T[k])
        suffix_best[k] = best
    batches: list[tuple[str, ...]] = []
    held: set[str] = set()
    h = n
    while True:
        cand = None
        new: set[str] = set()
        nbytes = 0
        for k in range(h - 1, -1, -1):
            if not valid[k]:
                break
            for w in P.op_weights[k]:
                if w not in held and w not in new:
                    new.add(w)
                    nbytes += P.weight_bytes[w]
            gain = suffix_best[h] - suffix_best[k]
            if gain <= 0:
                continue
            ratio = gain / max(1, nbytes)
            if cand is None or ratio > cand[0]:
                cand = (ratio, k, set(new))
        if cand is None:
            break
        _, k, piece = cand
        # last op first: the held suffix grows while the piece uploads, and each query can use it
        order = dict.fromkeys(w for i in range(h - 1, k - 1, -1) for w in P.op_weights[i] if w in piece)
        batches.append(tuple(order))
        held |= piece
        h = k
    best_from = [n] * (n + 1)
    b = n
    for k in range(n, -1, -1):  # (<=: the first of equals, as ``min`` over k = h..n picks)
        if T[k] <= T[b]:
            b = k
        best_from[k] = b
    target_k = min((x for x in range(n + 1) if valid[x]), key=lambda x: T[x])
    return IonnSchedule(tuple(batches), tuple(T), tuple(valid), tuple(best_from), target_k)


@dataclass(frozen=True)
class IonnStep:
    mask: int
    """Server ops of this query (a held suffix)."""
    target: int
    """The warm target: the best valid suffix once everything is held."""
    warm_ms: float
    """Additive warm latency of this query's split."""
    background: tuple[str, ...]
    """Weights of the schedule's pieces not held yet, in upload order."""
    details: dict


def step(P: Prepared, r: Rates, state: ServerState | None) -> IonnStep:
    """This query's split and what is left to upload."""
    sch = schedule(P, r)
    n = P.n
    held = state.held if state is not None else frozenset()
    h = n  # the longest suffix whose weights are all held
    while h > 0 and sch.valid[h - 1] and all(w in held for w in P.op_weights[h - 1]):
        h -= 1
    k, kt = sch.best_from[h], sch.target_k  # (precomputed with the schedule: session 17)
    full = (1 << n) - 1
    background = tuple(w for b in sch.batches for w in b if w not in held)
    details = {"split_after": k, "pieces": len(sch.batches), "held_suffix_from": h}
    return IonnStep(full & ~((1 << k) - 1), full & ~((1 << kt) - 1), sch.split_ms[k], background, details)
