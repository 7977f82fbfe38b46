"""The held sets and the captured-graph grid the decision property tests share (one definition: three copies of
``held_states`` had grown in test_prefetch_decision, test_strategy_bounds and test_prefix_sent, session 30)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu


def held_states(rng: random.Random, g: CostGraph, weights: Iterable[str] | None = None,
                in_flight: int = 2) -> Iterator[ServerState | None]:
    """None, a third of ``weights`` held (default: all of ``g``'s, sorted), and a random held set with up to
    ``in_flight`` of the others in flight (a random number of bytes left, 0 included)."""
    tw = sorted(g.weights if weights is None else weights)
    yield None
    if tw:
        yield ServerState(held=frozenset(tw[: len(tw) // 3]))
        part = rng.sample(tw, rng.randint(1, len(tw)))
        left = [w for w in tw if w not in part[1:]]
        infl = {w: rng.randint(0, g.weights[w]) for w in left[:in_flight] if g.weights[w] > 0}
        yield ServerState(held=frozenset(part[1:]), in_flight=infl)


def captured_grid(g0: CostGraph, rng: random.Random, in_flight: int = 2) -> Iterator[tuple[CostGraph, Link, dict]]:
    """(graph, link, ``planning.choose`` keywords) over a captured graph's grid: UE 1x / 10x / 14x slower, uplink
    20-1000 Mbit/s (RTT 5 ms), compute share 1 / 0.5, send cost 2e-6-2e-5 ms/B, ``held_states``, horizons 2-30."""
    for slow in (1.0, 10.0, 14.0):
        g = g0.scaled(ue=slow)
        for up in (20.0, 100.0, 400.0, 1000.0):
            for sh in (1.0, 0.5):
                for s in (2e-6, 1e-5, 2e-5):
                    link, share, cpu = Link(up, rtt_ms=5.0), Shares(compute=sh), UeCpu(send_ms_per_byte=s)
                    for st in held_states(rng, g, in_flight=in_flight):
                        for h in (2, 4, 5, 30):
                            yield g, link, {"state": st, "share": share, "ue_cpu": cpu, "horizon": h}


def recorded_calls(path, recorded_costs) -> Iterator[tuple[CostGraph, Link, dict, dict]]:
    """(costs, link, ``choose`` keywords, the call's record) of recorded ``planning.choose`` calls (a pickle of
    dicts: model, f = (UE, server) cost factors, link, kw and the answer), in order, each model's graph from
    ``recorded_costs`` (10x the UE) loaded once."""
    import pickle

    with open(path, "rb") as f:
        calls = pickle.load(f)
    bases: dict = {}
    for c in calls:
        m = c["model"]
        if m not in bases:
            bases[m] = CostGraph.from_json(recorded_costs / f"{m}.json").scaled(ue=10.0)
        yield bases[m].scaled(ue=c["f"][0], server=c["f"][1]), c["link"], c["kw"], c
