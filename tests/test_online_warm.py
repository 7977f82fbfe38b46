"""``OnlineTable.warm``: the per-table caches that a first decision with weights held (or in flight) used to build on
its request's clock (the weights' index, ``_held_candidates``' per-op vectors, each candidate's group index) are built
where the table is made (``precompute``, ``from_json``: normally while connecting). The decisions are the same with
and without them (they are caches of pure functions of the table), and the first held decision builds none of the
table's (it finds each object in place)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from partitioner import online
from partitioner.costgraph import CostGraph
from partitioner.prep import prepare
from partitioner.simulate import Rates
from partitioner.state import ServerState
from partitioner.synthetic import KINDS, random_dag

DATA = Path(__file__).parent / "data" / "costgraphs"


def _states(rng: random.Random, g: CostGraph, n: int) -> list[ServerState]:
    ws = sorted(g.weights)
    out = []
    for _ in range(n):
        held = frozenset(rng.sample(ws, rng.randint(0, len(ws))))
        rest = [w for w in ws if w not in held]
        infl = {w: rng.randint(0, g.weights[w]) for w in rng.sample(rest, min(len(rest), rng.randint(0, 3)))}
        out.append(ServerState(held=held, in_flight=infl))
    return out


def _rates(rng: random.Random) -> Rates:
    return Rates(up=rng.uniform(0.5, 200.0) * 125.0, dn=rng.uniform(5.0, 500.0) * 125.0, L=rng.uniform(0.5, 20.0),
                 phi=rng.choice([1.0, 0.5]))


def _fresh(table: online.OnlineTable, graph: CostGraph) -> online.OnlineTable:
    """The same table recompiled from its JSON without the warm-up (``warm`` a no-op while it is made)."""
    real = online.OnlineTable.warm
    online.OnlineTable.warm = lambda self, P: None
    try:
        return online.from_json(graph, online.to_json(table), use_cache=False)
    finally:
        online.OnlineTable.warm = real


def _held_built(table: online.OnlineTable) -> tuple:
    return (table.__dict__.get("_held_pre"), *(cp.__dict__.get("_group_index") for cp in table.candidates))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_a_made_table_is_warm_and_its_first_held_decision_builds_nothing_of_it(name):
    g = CostGraph.from_json(DATA / f"{name}.json")
    P = prepare(g)
    table = online.precompute(g)
    warm = online.from_json(g, online.to_json(table), use_cache=False)
    cold = _fresh(table, g)
    for t in (table, warm):  # made by either path: warm
        built = _held_built(t)
        assert built[0] is not None and all(b is not None for b in built[1:]), name
    assert cold.__dict__.get("_held_pre") is None  # (the check can fail: without the warm-up nothing is built)
    assert all(cp.__dict__.get("_group_index") is None for cp in cold.candidates)
    before = _held_built(warm)
    rng = random.Random(name)
    for state in _states(rng, g, 12):
        r = _rates(rng)
        s = rng.choice([0.0, 2e-5])
        assert warm.decide(P, r, state, send_ms_per_byte=s) == cold.decide(P, r, state, send_ms_per_byte=s)
    after = _held_built(warm)
    assert all(a is b for a, b in zip(before, after, strict=True))  # found in place, none rebuilt


@pytest.mark.parametrize("seed", range(12))
def test_warm_tables_decide_as_cold_ones_on_random_dags(seed):
    rng = random.Random(seed)
    g = random_dag(seed, 5 + seed % 9, KINDS[seed % len(KINDS)])
    P = prepare(g)
    table = online.precompute(g, use_cache=False, search_s=0.05, budget_s=2.0)
    cold = _fresh(table, g)
    for state in _states(rng, g, 6):
        r = _rates(rng)
        for mode in ("cold", "serial"):
            assert table.decide(P, r, state, mode) == cold.decide(P, r, state, mode)
