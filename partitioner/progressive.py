"""Progressive offloading: each request is planned against what the server holds now (IONN-style,
across requests) with parallel uploading inside the request (MJOA-style); spare uplink time streams
the warm target's remaining weights in the target's need order, so the earliest-needed server weights
(the ones that would stall the server) arrive first and later ones hide behind server compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.costgraph import CostGraph, Link
from partitioner.plan import Plan
from partitioner.planners import plan
from partitioner.prep import prepare
from partitioner.simulate import Rates, run, split_costs
from partitioner.state import ServerState, Shares


@dataclass(frozen=True)
class ProgressiveStep:
    plan: Plan
    """This request's plan (cold with respect to ``state``)."""
    target: frozenset[str]
    """The warm target server set."""
    background: tuple[str, ...]
    """Weights of the target not held and not needed by this request, in the target's need order."""

    @property
    def upload_order(self) -> tuple[str, ...]:
        """The whole uplink order: this request's items (need order), then the background weights."""
        return self.plan.upload_order + self.background


def target_order(graph: CostGraph, target: frozenset[str], state: ServerState | None) -> tuple[str, ...]:
    """Weights the target needs that the server does not hold, earliest-needed first."""
    P = prepare(graph)
    held = state.held if state is not None else frozenset()
    out, seen = [], set()
    for i, name in enumerate(P.names):
        if name in target:
            for w in P.op_weights[i]:
                if w not in seen and w not in held:
                    seen.add(w)
                    out.append(w)
    return tuple(out)


def next_request(graph: CostGraph, link: Link, state: ServerState | None = None, *,
                 share: Shares | None = None, target: frozenset[str] | None = None,
                 budget_s: float = 0.5) -> ProgressiveStep:
    """Plan the next request given what the server holds and what is in flight."""
    state = state or ServerState()
    p = plan("mjoa", graph, link, state=state, share=share, budget_s=budget_s)
    tgt = frozenset(target) if target is not None else (p.warm_target or frozenset())
    now = set(p.upload_order)
    bg = tuple(w for w in target_order(graph, tgt, state) if w not in now)
    return ProgressiveStep(p, tgt, bg)


@dataclass(frozen=True)
class StreamPoint:
    request: int
    latency_ms: float
    server_ops: frozenset[str]
    held_bytes: int


def stream(graph: CostGraph, link: Link, n_requests: int, *, gap_ms: float = 0.0,
           share: Shares | None = None, state: ServerState | None = None,
           budget_s: float = 0.5) -> list[StreamPoint]:
    """Predicted latency of each request of a stream: what the server holds grows with every request
    (its own weights) and with the background stream during the request's idle uplink time and the gap."""
    P = prepare(graph)
    r = Rates.of(link, share)
    state = state or ServerState()
    target = None
    out = []
    for k in range(n_requests):
        step = next_request(graph, link, state, share=share, target=target, budget_s=budget_s)
        target = step.target
        res = run(P, P.mask_of(step.plan.server_ops), r, "cold", state)
        busy = (res.upload_bytes + res.sent_tensor_bytes) / r.up
        spare = max(0.0, res.latency_ms + gap_ms - busy) * r.up  # bytes the background stream sends
        held = set(step.plan.upload_order) & set(graph.weights)
        infl = dict(state.in_flight)
        for w in step.background:
            left = infl.get(w, graph.weights[w])
            if spare >= left:
                spare -= left
                held.add(w)
                infl.pop(w, None)
            else:
                infl[w] = int(left - spare)
                break
        state = ServerState(held=state.held | held, in_flight={w: b for w, b in infl.items() if w not in held})
        out.append(StreamPoint(k, res.latency_ms, step.plan.server_ops,
                               sum(graph.weights[w] for w in state.held)))
    return out


def suffix_targets(graph: CostGraph, link: Link, state: ServerState | None = None, *,
                   share: Shares | None = None, limit: int = 4) -> list[frozenset[str]]:
    """Smaller warm targets than the warm optimum: suffixes of the op order on the Pareto front of
    (weight bytes still to upload, additive warm latency), at most ``limit`` of them spread over the
    bytes. An investment that pays over a short horizon is often a cheap tail, not the whole target."""

    P = prepare(graph)
    n = P.n
    T = split_costs(P, Rates.of(link, share))
    held = state.held if state is not None else frozenset()
    front: list[tuple[int, float, int]] = []  # (bytes, warm, k), k descending = bytes ascending
    seen: set[str] = set()
    nbytes = 0
    best = T[n]
    for k in range(n - 1, -1, -1):
        if P.pinned[k]:
            break
        for w in P.op_weights[k]:
            if w not in seen and w not in held:
                seen.add(w)
                nbytes += P.weight_bytes[w]
        if T[k] < best - 1e-9:
            best = T[k]
            front.append((nbytes, T[k], k))
    if len(front) > limit:  # keep the cheapest, the best and evenly spaced ones between
        idx = {round(i * (len(front) - 1) / (limit - 1)) for i in range(limit)}
        front = [front[i] for i in sorted(idx)]
    return [frozenset(P.names[k:]) for _, _, k in front]
