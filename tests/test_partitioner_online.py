"""The online decision (precomputed candidates, tiny exact evaluation) against the full search.

- the compiled evaluation is the simulator (plain and CPU-shared), to float rounding;
- the online cold decision is within ``STATED_BOUND`` of the exhaustive optimum (exact oracle) on
  random DAGs over links, shares, RTTs and held sets, and so is its warm target (the seeds where it
  was measured above 5 % are fixed examples);
- on captured graphs (resnet18, mobilenet_v2 profiles committed under tests/data) it is within the
  bound of mjoa's exact branch and bound, including held sets and calibrated (rescaled) copies;
- ``planning.choose`` decides the same with and without the table for auto and mjoa (within the bound),
  over a grid of links, server shares, send costs and held sets;
- at the grid points the offline search ran on, the online decision is the exhaustive optimum.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from partitioner.costgraph import CostGraph, Link
from partitioner.mjoa import mjoa
from partitioner.online import STATED_BOUND, cached, compile_partition, evaluate, evaluate_shared, precompute
from partitioner.oracle import optimal_enum, partitions
from partitioner.prep import prepare
from partitioner.simulate import Rates, run
from partitioner.state import ServerState, Shares
from partitioner.synthetic import KINDS, random_dag
from partitioner.uecpu import UeCpu, run_shared, simulate_cpu

DATA = Path(__file__).parent / "data" / "costgraphs"
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(x: float, y: float, rel: float = 1e-9) -> bool:
    return abs(x - y) <= rel * max(1.0, abs(x), abs(y))


def small_dag(seed: int):
    return random_dag(seed, 5 + seed % 9, KINDS[seed % len(KINDS)], pinned_prob=0.1 if seed % 5 == 0 else 0.0)


def rates(rng: random.Random, base: float) -> Rates:
    return Rates(up=base * 2 ** rng.uniform(-11, 11), dn=base * 2 ** rng.uniform(-11, 11), L=rng.uniform(0, 30),
                 phi=rng.choice([1.0, 0.7, 0.3, 0.1]))


def some_state(rng: random.Random, g: CostGraph) -> ServerState | None:
    kind = rng.choice(["none", "random", "suffix"])
    ws = sorted(g.weights)
    if kind == "none" or not ws:
        return None
    if kind == "random":
        held = frozenset(rng.sample(ws, rng.randint(1, len(ws))))
        left = [w for w in ws if w not in held]
        infl = {w: rng.randint(0, g.weights[w]) for w in rng.sample(left, min(2, len(left)))}
        return ServerState(held=held, in_flight=infl)
    k = rng.randrange(len(g.ops))  # what a previous split after op k left on the server
    return ServerState(held=frozenset(w for op in g.ops[k:] for w in op.weights))


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_compiled_evaluation_is_the_simulator(seed):
    rng = random.Random(seed)
    g = small_dag(seed)
    P = prepare(g)
    masks = list(partitions(P, limit=5000))
    for m in rng.sample(masks, min(6, len(masks))):
        cp = compile_partition(P, m)
        r = rates(rng, 1e4)
        state = some_state(rng, g)
        s = 10 ** rng.uniform(-7, -3)
        for mode in ("cold", "warm", "serial"):
            ref = run(P, m, r, mode, state)
            got = evaluate(cp, r, mode, state, weight_bytes=P.weight_bytes)
            assert close(got.latency_ms, ref.latency_ms), (mode, got, ref.latency_ms)
            assert got.upload_bytes == ref.upload_bytes
            assert cp.need_order(state, mode) == ref.upload_order
            sref, steal = run_shared(P, m, r, s, mode, state)
            sgot, gsteal = evaluate_shared(cp, r, s, mode, state, weight_bytes=P.weight_bytes)
            assert close(sgot.latency_ms, sref.latency_ms), (mode, "shared")
            assert close(sgot.ue_finish_ms, sref.ue_finish_ms) and close(gsteal, steal)


@SETTINGS
@given(seed=st.integers(0, 10_000))
@example(seed=2807)  # the draws measured above 5 % (cold up to 10.8 %, warm up to 3.6 %): partitioner.online
@example(seed=3892)
@example(seed=4102)
@example(seed=4662)
@example(seed=5047)
@example(seed=6027)
@example(seed=7952)
@example(seed=2995)  # above the bound before the improvement across the cut (15.5-38 %)
@example(seed=5169)
@example(seed=7242)
@example(seed=7387)
@example(seed=9692)
def test_online_decision_within_bound_of_exhaustive_optimum(seed):
    rng = random.Random(seed)
    g = small_dag(seed)
    P = prepare(g)
    table = precompute(g, use_cache=False)
    base = (sum(P.weight_bytes.values()) or 1) / max(sum(P.a), 1e-9)
    for _ in range(4):
        r = rates(rng, base)
        state = some_state(rng, g)
        m, v = table.decide(P, r, state)
        assert close(v, run(P, m, r, "cold", state).latency_ms)  # the reported value is the simulator's
        _, opt, _ = optimal_enum(P, r, "cold", state)
        assert v <= opt * (1 + STATED_BOUND) + 1e-9, (seed, r, v, opt)
        _, wv = table.decide(P, r, None, "warm")
        _, wopt, _ = optimal_enum(P, r, "warm")
        assert wv <= wopt * (1 + STATED_BOUND) + 1e-9, (seed, r, "warm", wv, wopt)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_online_decision_on_captured_graphs(name):
    g = CostGraph.from_json(DATA / f"{name}.json")
    P = prepare(g)
    table = precompute(g)
    rng = random.Random(7)
    base = sum(P.weight_bytes.values()) / sum(P.a)
    gaps = []
    for i in range(10):
        r = rates(rng, base)
        state = some_state(rng, g) if i % 2 else None
        m, v = table.decide(P, r, state)
        assert close(v, run(P, m, r, "cold", state).latency_ms)
        ref = mjoa(P, r, state, budget_s=5.0)
        if ref.cold.exact:
            gaps.append(v / ref.cold.value - 1)
            assert v <= ref.cold.value * (1 + STATED_BOUND) + 1e-9, (name, r, v, ref.cold.value)
        if ref.warm.exact:
            assert close(table.decide(P, r, None, "warm")[1], ref.warm.value, 1e-6)
    assert gaps  # the reference proved its optimum at least somewhere
    # a calibrated copy (UE 3x slower, server 2x) reuses the table and is scored on its own costs
    slow = replace(g, ops=tuple(replace(o, ue_ms=o.ue_ms * 3, server_ms=o.server_ms * 2) for o in g.ops))
    assert cached(slow) is table
    Ps = prepare(slow)
    r = Rates.of(Link(200.0, rtt_ms=10.0))
    m, v = table.decide(Ps, r)
    assert close(v, run(Ps, m, r, "cold").latency_ms)
    ref = mjoa(Ps, r, budget_s=5.0).cold
    assert not ref.exact or v <= ref.value * (1 + STATED_BOUND) + 1e-9


def test_choose_online_matches_full_search():
    from ue_client import planning

    g = CostGraph.from_json(DATA / "resnet18.json")
    for link in (Link(20.0, rtt_ms=20.0), Link(400.0, rtt_ms=2.0)):
        for cpu in (None, UeCpu(send_ms_per_byte=2e-5), UeCpu(send_ms_per_byte=1e-4)):
            for policy in ("mjoa", "auto"):
                on = planning.choose(policy, g, link, ue_cpu=cpu, horizon=4)
                off = planning.choose(policy, g, link, ue_cpu=cpu, horizon=4, online=False, budget_s=5.0)
                assert on.predicted_ms <= off.predicted_ms * (1 + STATED_BOUND) + 1e-9, (policy, link, cpu)
                assert on.details["online"] and "online" not in off.details
                # the prediction is the one simulator's, whichever path computed it
                ref = simulate_cpu(g, link, on.server_ops, cpu, state=None).latency_ms
                assert close(on.predicted_ms, ref, 1e-6)
                ref_w = simulate_cpu(g, link, on.server_ops, cpu, mode="warm").latency_ms if on.server_ops else None
                assert ref_w is None or close(on.warm_ms, ref_w, 1e-6)
                assert on.upload_order == simulate_cpu(g, link, on.server_ops, cpu).upload_order


def test_table_is_stored_with_the_profile_and_found_by_a_calibrated_copy(tmp_path, monkeypatch):
    from partitioner import online
    from ue_client import planning

    monkeypatch.setenv("COINFER_CACHE_DIR", str(tmp_path))
    g = small_dag(11)
    t1 = planning.online_table(g)
    stored = list((tmp_path / "online").glob("*.json"))
    assert len(stored) == 1
    # a fresh process would find it on disk: a calibrated copy (a new object, same costs up to factors)
    monkeypatch.setattr(online, "_CACHE", type(online._CACHE)())
    slow = replace(g, ops=tuple(replace(o, ue_ms=o.ue_ms * 2.5) for o in g.ops))
    t2 = planning.online_table(slow)
    assert t2 is not t1 and [c.mask for c in t2.candidates] == [c.mask for c in t1.candidates]
    r = Rates.of(Link(30.0, rtt_ms=4.0))
    Ps = prepare(slow)
    (m1, v1), (m2, v2) = t1.decide(Ps, r), t2.decide(Ps, r)
    assert m1 == m2 and close(v1, v2)
    # a different profile of the same structure does not match the stored table
    other = replace(g, ops=tuple(replace(o, ue_ms=o.ue_ms * (1 + i % 2)) for i, o in enumerate(g.ops)))
    assert online.from_json(other, stored[0].read_text()) is None
    assert online.from_json(g, "{not json") is None


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_precomputed_suffix_targets_are_progressive_suffix_targets(seed):
    from partitioner.progressive import suffix_targets

    rng = random.Random(seed)
    g = small_dag(seed)
    table = precompute(g, search_s=0.05, budget_s=2.0, use_cache=False)
    slow = replace(g, ops=tuple(replace(o, ue_ms=o.ue_ms * 3.0, server_ms=o.server_ms * 0.5) for o in g.ops))
    for graph in (g, slow):
        for _ in range(3):
            link = Link(10 ** rng.uniform(0, 3), 10 ** rng.uniform(0, 3), rtt_ms=rng.uniform(0, 40))
            state = some_state(rng, g)
            assert table.suffix_targets(prepare(graph), Rates.of(link), state) == suffix_targets(graph, link, state)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_online_decision_is_exact_at_the_grid_points(seed):
    """Where the offline search ran (coarse rate grid x server speeds, nothing held, no RTT, downlink =
    uplink) and proved its optimum, the online decision equals the exhaustive optimum, cold and warm."""
    from partitioner.online import COARSE_STEP, RATE_EXPONENTS, SPEED_FACTORS

    g = small_dag(seed)
    P = prepare(g)
    table = precompute(g, use_cache=False)
    if table.exact_points < table.grid_points:
        return  # a search ran out of its budget: nothing is claimed there
    base = (sum(P.weight_bytes.values()) or sum(P.d) or 1) / max(sum(P.a), 1e-9)
    for e in range(RATE_EXPONENTS[0], RATE_EXPONENTS[-1] + 1, COARSE_STEP):
        for speed in SPEED_FACTORS:
            r = Rates(up=base * 2.0**e, dn=base * 2.0**e, L=0.0, phi=speed)
            for mode in ("cold", "warm"):
                _, v = table.decide(P, r, None, mode)
                _, opt, _ = optimal_enum(P, r, mode)
                assert close(v, opt, 1e-9), (seed, e, speed, mode, v, opt)


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_choose_online_over_links_shares_and_held_sets(name):
    """``planning.choose`` (the runtime's whole decision: guard, investment rule, predictions) with the
    precomputed table against the full tree search, on captured graphs over a grid of uplinks, server
    shares, send costs and held sets (nothing, half and all of the warm target, a random half): the
    online prediction is within ``STATED_BOUND`` of the full search's, both predictions are the one
    simulator's for the partition they return, and the online plan's std is ``planning.moments``'."""
    from ue_client import planning

    g = CostGraph.from_json(DATA / f"{name}.json")
    rng = random.Random(name)
    ws = sorted(g.weights)
    for up in (20.0, 200.0):
        for compute in (1.0, 0.3):
            share = Shares(compute=compute)
            link = Link(up, rtt_ms=10.0)
            for cpu in (None, UeCpu(send_ms_per_byte=2e-5)):
                target = planning.choose("auto", g, link, share=share, ue_cpu=cpu, horizon=4).warm_target or frozenset()
                tw = sorted({w for op in g.ops if op.name in target for w in op.weights})
                states = [None, ServerState(held=frozenset(tw[: len(tw) // 2])), ServerState(held=frozenset(tw)),
                          ServerState(held=frozenset(rng.sample(ws, len(ws) // 2)))]
                for j, state in enumerate(states):
                    spread = {"uplink_cv": 0.2, "ue_cv": 0.1} if j % 2 else {}
                    for policy in ("mjoa", "auto"):
                        kw = {"target": target, "horizon": 4} if policy == "auto" else {}
                        on = planning.choose(policy, g, link, share=share, ue_cpu=cpu, state=state, **kw, **spread)
                        # the plan's std from the scored partition = robust's moments model, simulated again
                        ref_sd = planning.moments(g, on.server_ops, link, share, ue_cpu=cpu, state=state, **spread)
                        assert close(on.details["std_ms"], ref_sd, 1e-9), (on.details["std_ms"], ref_sd)
                        off = planning.choose(policy, g, link, share=share, ue_cpu=cpu, state=state, online=False,
                                              budget_s=5.0, **kw)
                        ref_off = planning.moments(g, off.server_ops, link, share, ue_cpu=cpu, state=state)
                        assert close(off.details["std_ms"], ref_off, 1e-9), (off.details["std_ms"], ref_off)
                        assert on.predicted_ms <= off.predicted_ms * (1 + STATED_BOUND) + 1e-9, (
                            name, policy, up, compute, cpu, state and len(state.held))
                        for c in (on, off):
                            ref = simulate_cpu(g, link, c.server_ops, cpu, state=state, share=share)
                            assert close(c.predicted_ms, ref.latency_ms, 1e-6)
                            assert c.upload_order == ref.upload_order
