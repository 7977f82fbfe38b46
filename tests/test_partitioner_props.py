"""Property tests of the partitioner on >= 300 random DAGs x several bandwidths (DESIGN.md §5); the exact planners
against the oracle on the first 150 in the default run, on all 300 in ``make test-all``."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.compress import compress
from partitioner.costgraph import Link, chain
from partitioner.mincut import dads
from partitioner.mjoa import mjoa
from partitioner.oracle import optimal_enum, optimal_milp, partitions
from partitioner.prep import prepare
from partitioner.simulate import Rates, additive_warm_ms, chain_closed_form, run, simulate
from partitioner.synthetic import KINDS, random_dag

N_DAGS = 300
CHUNK = 30
LINKS = (Link(2.0, rtt_ms=20.0), Link(40.0, 80.0, rtt_ms=8.0), Link(1000.0, rtt_ms=1.0))


def dag(seed: int):
    n = 16 if seed % 25 == 0 else 4 + seed % 11
    return random_dag(seed, n, KINDS[seed % len(KINDS)], pinned_prob=0.08 if seed % 7 == 0 else 0.0)


def close(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-6 * max(1.0, abs(x), abs(y))


@pytest.mark.parametrize("start", [s if s < N_DAGS // 2 else pytest.param(s, marks=pytest.mark.slow)
                                   for s in range(0, N_DAGS, CHUNK)])  # the first 150 DAGs here, all 300 in test-all
def test_exact_planners_match_oracle(start):
    """dads == optimal (additive warm), cic compressed optimum == uncompressed, mjoa == optimal cold."""
    for seed in range(start, start + CHUNK):
        g = dag(seed)
        P = prepare(g)
        comp = compress(g)
        for link in LINKS:
            r = Rates.of(link)
            _, opt_add, _ = optimal_enum(P, r, "additive")
            md, vd = dads(P, r)
            assert close(vd, opt_add), (seed, link, vd, opt_add)
            assert close(additive_warm_ms(P, md, r), vd)
            _mc, vc = comp.decide(r)
            assert close(vc, opt_add), (seed, link, "cic", vc, opt_add)
            _, opt_small, _ = optimal_enum(prepare(comp.graph), r, "additive")
            assert close(opt_small, opt_add), (seed, "compressed optimum")
            _, opt_cold, _ = optimal_enum(P, r, "cold")
            res = mjoa(P, r, budget_s=5.0)
            assert res.cold.exact
            assert close(res.cold.value, opt_cold), (seed, link, res.cold.value, opt_cold)
            assert close(run(P, res.cold.mask, r, "cold").latency_ms, opt_cold)
            _, opt_warm, _ = optimal_enum(P, r, "warm")
            assert close(res.warm.value, opt_warm), (seed, link, "warm target")


@pytest.mark.parametrize("start", range(0, N_DAGS, CHUNK))
def test_schedule_orderings(start):
    """warm <= cold <= serial, need order <= any other upload order, warm sim <= additive model."""
    for seed in range(start, start + CHUNK):
        g = dag(seed)
        P = prepare(g)
        rng = random.Random(seed)
        masks = list(partitions(P, limit=5000))
        for link in LINKS:
            r = Rates.of(link)
            for m in rng.sample(masks, min(6, len(masks))):
                cold = run(P, m, r, "cold")
                warm = run(P, m, r, "warm")
                serial = run(P, m, r, "serial")
                assert warm.latency_ms <= cold.latency_ms + 1e-9
                assert cold.latency_ms <= serial.latency_ms + 1e-9
                assert warm.latency_ms <= additive_warm_ms(P, m, r) + 1e-9
                items = list(cold.upload_order)
                for _ in range(3):
                    rng.shuffle(items)
                    other = run(P, m, r, "cold", order=items)
                    assert cold.latency_ms <= other.latency_ms + 1e-9, (seed, items)


def test_reordering_can_hurt():
    """The order check above is not vacuous: a bad order is strictly worse on a simple chain."""
    g = chain([(5.0, 100.0, 1000, 10_000_000), (5.0, 100.0, 1000, 10_000_000)], input_bytes=1000)
    r = Rates.of(Link(100.0, rtt_ms=2.0))
    m = prepare(g).mask_of(["op0", "op1"])
    need = run(P := prepare(g), m, r, "cold")
    assert need.upload_order == ("x", "w0", "w1")
    worse = run(P, m, r, "cold", order=["w1", "w0", "x"])
    assert worse.latency_ms > need.latency_ms + 90.0


def test_milp_matches_enumeration():
    for seed in range(0, 60):
        g = dag(seed)
        P = prepare(g)
        for link in LINKS:
            r = Rates.of(link)
            _, v, _ = optimal_enum(P, r, "additive")
            _, vm = optimal_milp(P, r)
            assert close(v, vm), (seed, v, vm)


chain_ops = st.lists(st.tuples(st.floats(0, 20), st.floats(0, 20), st.integers(0, 2_000_000),
                               st.integers(0, 20_000_000)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(chain_ops, st.integers(0, 2_000_000), st.floats(0.5, 2000), st.floats(0, 50), st.data())
def test_chain_closed_form_equals_simulator(ops, inp, mbps, rtt, data):
    g = chain(ops, input_bytes=inp)
    link = Link(mbps, mbps * 2, rtt_ms=rtt)
    k = data.draw(st.integers(0, len(ops)))
    server = [f"op{i}" for i in range(k, len(ops))]
    for mode in ("warm", "cold"):
        sim = simulate(g, link, server, mode=mode, timeline=False).latency_ms
        cf = chain_closed_form(g, link, k, mode=mode)
        assert abs(sim - cf) <= 1e-9 * max(1.0, cf), (mode, sim, cf)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 12), st.floats(1, 500), st.floats(0, 30))
def test_timeline_is_consistent(seed, n, mbps, rtt):
    """Timelines obey the schedule rules: one op at a time per side, server ops after their inputs."""
    g = random_dag(seed, n)
    P = prepare(g)
    masks = list(partitions(P, limit=2000))
    m = masks[seed % len(masks)]
    link = Link(mbps, rtt_ms=rtt)
    res = simulate(g, link, P.names_of(m))
    tl = res.timeline
    for segs in (tl.ue, tl.server, tl.uplink):
        for s1, s2 in itertools.pairwise(segs):
            assert s1.end_ms <= s2.start_ms + 1e-9
    done_up = {}
    for s in tl.uplink:
        done_up[s.name] = max(done_up.get(s.name, 0.0), s.end_ms)
    ue_end = {s.name: s.end_ms for s in tl.ue}
    for s in tl.server:
        op = g.ops[g.index[s.name]]
        assert s.start_ms >= link.one_way_ms - 1e-9
        for src in op.inputs:
            if src in ue_end or src in g.inputs:
                assert s.start_ms >= done_up[src] + link.one_way_ms - 1e-9
                if src in ue_end:
                    assert done_up[src] >= ue_end[src] - 1e-9
        for w in op.weights:
            if w in done_up:
                assert s.start_ms >= done_up[w] + link.one_way_ms - 1e-9
    up_total = sum(s.end_ms - s.start_ms for s in tl.uplink)
    assert abs(up_total - (res.upload_bytes + res.sent_tensor_bytes) / (mbps * 125)) < 1e-6 * max(1, up_total)
    assert res.latency_ms >= max([s.end_ms for s in tl.ue] + [0.0]) - 1e-9
