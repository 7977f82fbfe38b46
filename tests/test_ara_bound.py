"""``partitioner.allocation.bounded_graph``: what one ARA plan may cost is bounded before it starts (a
10k-op chain's join took 48 CPU s of the planner thread beside a googlenet UE). A graph within the bound
is planned as sent; a larger one contracted (exact for the additive warm cost) or as one op."""

from __future__ import annotations

import math

import pytest

from partitioner.allocation import Allocator, bounded_graph, graph_size, whole_model
from partitioner.compress import contract
from partitioner.costgraph import Link, chain
from partitioner.prep import prepare
from partitioner.simulate import Rates, run
from partitioner.state import Shares
from partitioner.synthetic import KINDS, random_dag


def test_a_graph_within_the_bound_is_planned_as_sent() -> None:
    g = random_dag(1, 300, "branches")
    got, rule = bounded_graph(g, graph_size(g))
    assert got is g and rule == ""


def test_a_long_chain_is_contracted_and_a_wide_graph_planned_whole() -> None:
    g = chain([(4.0, 1.0, 4_000, 20_000)] * 999, input_bytes=4_000)
    got, rule = bounded_graph(g, 1536)  # 999 ops + 999 weights
    assert rule == "contracted" and graph_size(got) <= 1536 and len(got) == len(contract(g)[0])
    wide = random_dag(3, 900, "branches")
    got, rule = bounded_graph(wide, 1024)  # 900 ops + 676 weights; contracted 757 ops + their weights
    assert rule == "whole" and len(got) == 1 and graph_size(got) <= 2
    # too many ops to contract (the contraction's own cost): whole at once
    got, rule = bounded_graph(chain([(4.0, 1.0, 4_000, 20_000)] * 2000), 1536, contract_ops=1024)
    assert rule == "whole" and len(got) == 1
    assert graph_size(bounded_graph(g, 0)[0]) == 2  # one op, one weight, whatever the bound


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_the_whole_model_costs_what_the_graph_costs_all_local_and_all_remote(kind: str, seed: int) -> None:
    """One op summing the graph: all on the UE (cold, warm) and all on the server warm, the simulator gives
    the same latency as for the graph it stands for (at several links and shares); all on the server cold
    no less (the one op waits for every weight, where the graph's first ops start once theirs are up) and
    no more than that plus the graph's server time."""
    g = random_dag(seed, 40, kind)
    w = whole_model(g)
    assert math.isclose(w.ops[0].ue_ms, sum(o.ue_ms for o in g.ops))
    assert w.ops[0].offloadable == all(o.offloadable for o in g.ops)
    assert list(w.weights.values()) == [sum(g.weights.values())]
    P, W = prepare(g), prepare(w)
    for link, share in ((Link(20.0, rtt_ms=5.0), None), (Link(400.0, 100.0, 1.0), Shares(0.3, 0.5))):
        r = Rates.of(link, share)
        for mode in ("cold", "warm"):
            assert math.isclose(run(W, 0, r, mode).latency_ms, run(P, 0, r, mode).latency_ms, rel_tol=1e-9)
            if W.mask_of(frozenset({"whole"})) and all(o.offloadable for o in g.ops):
                every = P.mask_of(frozenset(o.name for o in g.ops))
                whole, graph = run(W, 1, r, mode).latency_ms, run(P, every, r, mode).latency_ms
                if mode == "warm":
                    assert math.isclose(whole, graph, rel_tol=1e-9), (kind, seed)
                else:
                    server = sum(o.server_ms for o in g.ops) / r.phi
                    assert graph * (1 - 1e-9) <= whole <= graph + server, (kind, seed, whole, graph)


def test_ara_plans_a_bounded_graph() -> None:
    """ARA joins a UE whose graph was planned whole beside an honest one: both get a plan and shares."""
    a = Allocator(policy="neurosurgeon")
    honest = chain([(4.0, 1.0, 40_000, 20_000)] * 20, input_bytes=4_000)
    a.join("h", honest, Link(20.0, rtt_ms=5.0))
    big, rule = bounded_graph(random_dag(3, 900, "branches"), 1024)
    assert rule == "whole"
    alloc = a.join("x", big, Link(20.0, rtt_ms=5.0))
    assert set(alloc.plans) == {"h", "x"} and a.held_size() == 42 and a.held_size(but="x") == 40
