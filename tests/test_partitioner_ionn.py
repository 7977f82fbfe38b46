"""IONN as a policy: suffix splits only, never an upload on a query's critical path, pieces by gain
per byte, and the held suffix growing as the pieces go up."""

from __future__ import annotations

import pytest

from partitioner import ionn
from partitioner.costgraph import Link, chain
from partitioner.planners import plan
from partitioner.prep import prepare
from partitioner.simulate import Rates
from partitioner.state import ServerState
from partitioner.synthetic import random_dag

LINK = Link(50.0, 100.0, rtt_ms=5.0)


@pytest.mark.parametrize("seed", range(10))
def test_ionn_runs_only_held_suffixes_and_converges(seed):
    g = random_dag(seed, 12, pinned_prob=0.1).with_server_speedup(10.0)
    P = prepare(g)
    held: frozenset[str] = frozenset()
    warm_prev = None
    for _ in range(40):
        p = plan("ionn", g, LINK, state=ServerState(held=held))
        k = p.details["split_after"]
        assert p.server_ops == frozenset(P.names[k:])  # a suffix of the topological order
        need = {w for i in range(k, P.n) for w in P.op_weights[i]}
        assert need <= held, "IONN uploaded on the critical path"
        assert p.upload_bytes == 0 and p.cold_ms == pytest.approx(p.warm_ms)
        if warm_prev is not None:
            assert p.warm_ms <= warm_prev + 1e-9  # more held never makes the chosen split worse
        warm_prev = p.warm_ms
        bg = p.details["background"]
        assert not set(bg) & held and len(bg) == len(set(bg))
        if not bg:
            break
        held = held | set(bg[:2])  # two weights arrive per query
    else:
        pytest.fail("the pieces never finished")
    sch = ionn.schedule(P, Rates.of(LINK, None))
    best = min(v for v, ok in zip(sch.split_ms, sch.valid) if ok)
    assert plan("ionn", g, LINK, state=ServerState(held=held)).predicted_ms == pytest.approx(best)


def test_ionn_pieces_go_up_from_the_output_end():
    # weights grow toward the output; compute is front-heavy: the tail alone already gains
    g = chain([(30.0, 1.0, 1000, 10_000), (30.0, 1.0, 1000, 10_000), (1.0, 0.1, 1000, 4_000_000),
               (1.0, 0.1, 10, 4_000_000)]).with_server_speedup(20.0)
    P = prepare(g)
    sch = ionn.schedule(P, Rates.of(LINK, None))
    flat = [w for b in sch.batches for w in b]
    assert flat and len(flat) == len(set(flat))
    pos = {w: i for i, ws in enumerate(P.op_weights) for w in ws}
    first = sch.batches[0]
    assert len(first) >= 2
    assert [pos[w] for w in first] == sorted((pos[w] for w in first), reverse=True)


def test_ionn_schedule_is_cached_per_link():
    g = random_dag(1, 10)
    P = prepare(g)
    a = ionn.schedule(P, Rates.of(LINK, None))
    assert ionn.schedule(P, Rates.of(LINK, None)) is a
    assert ionn.schedule(P, Rates.of(Link(5.0, 5.0, 50.0), None)) is not a


def _step_by_scan(P, r, state):
    """``ionn.step``'s split and warm target as the published rule states them, by a scan per query (the
    held suffix's best split over k = h..n, the best valid split): the reference of the precomputed lookups."""
    sch = ionn.schedule(P, r)
    held = state.held
    h = P.n
    while h > 0 and sch.valid[h - 1] and all(w in held for w in P.op_weights[h - 1]):
        h -= 1
    k = min(range(h, P.n + 1), key=lambda x: sch.split_ms[x])
    kt = min((x for x in range(P.n + 1) if sch.valid[x]), key=lambda x: sch.split_ms[x])
    return k, kt


@pytest.mark.parametrize("seed", range(12))
def test_ionn_steps_lookups_are_the_scans_answer(seed):
    """The per-query split and warm target looked up in the schedule (session 17) are the scan's, on random
    DAGs (pinned ops, ties from equal op costs), links and held sets, every query of a stream."""
    import random

    rng = random.Random(seed)
    g = random_dag(seed, rng.choice([6, 12, 25]), pinned_prob=rng.choice([0.0, 0.1, 0.3]))
    g = g.with_server_speedup(rng.choice([1.0, 10.0]))
    P = prepare(g)
    for link in (LINK, Link(rng.uniform(1.0, 500.0), rng.uniform(5.0, 500.0), rtt_ms=rng.uniform(1.0, 50.0))):
        r = Rates.of(link, None)
        held: frozenset[str] = frozenset()
        weights = sorted(g.weights)
        for _ in range(30):
            st = ionn.step(P, r, ServerState(held=held))
            k, kt = _step_by_scan(P, r, ServerState(held=held))
            full = (1 << P.n) - 1
            assert st.mask == full & ~((1 << k) - 1) and st.target == full & ~((1 << kt) - 1)
            assert st.warm_ms == ionn.schedule(P, r).split_ms[k]
            if not weights:
                break
            held = held | set(rng.sample(weights, min(len(weights), rng.choice([1, 2, 5]))))
    # ties: a chain of equal ops, every split of equal cost where the link is free: the first of equals
    g = chain([(1.0, 1.0, 0, 1)] * 8)
    P = prepare(g)
    r = Rates.of(Link(1e9, 1e9, rtt_ms=0.0), None)
    for held in (frozenset(), frozenset(g.weights)):
        st = ionn.step(P, r, ServerState(held=held))
        k, kt = _step_by_scan(P, r, ServerState(held=held))
        assert st.mask == ((1 << P.n) - 1) & ~((1 << k) - 1) and st.target == ((1 << P.n) - 1) & ~((1 << kt) - 1)
