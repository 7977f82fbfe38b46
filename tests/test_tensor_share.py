"""Cut tensors predicted at the request share, weights at the uplink share (``Shares.tensor_uplink``,
``Rates.tup``): the server paces a request's cut tensors to at least the session's equal share of the cell
while the allocator may give its weights far less (session 10: narrow UEs under ARA predicted 810 ms for a
warm request that took 37 ms). The simulator, the compiled (online) evaluation, the CPU-shared simulation,
the lower bounds and mjoa's exact search all take the tensor rate; the client plans with the session's
request share."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.costgraph import CostGraph, CostGraphError, Link
from partitioner.mjoa import tree_search
from partitioner.online import compile_partition, evaluate, evaluate_shared, lower_bound, precompute
from partitioner.oracle import optimal_enum, partitions
from partitioner.prep import prepare
from partitioner.simulate import Rates, run
from partitioner.state import ServerState, Shares
from partitioner.synthetic import KINDS, random_dag
from partitioner.uecpu import UeCpu, run_shared, simulate_cpu
from ue_client import planning

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(x: float, y: float, rel: float = 1e-9) -> bool:
    return abs(x - y) <= rel * max(1.0, abs(x), abs(y))


def small_dag(seed: int) -> CostGraph:
    return random_dag(seed, 5 + seed % 9, KINDS[seed % len(KINDS)], pinned_prob=0.1 if seed % 5 == 0 else 0.0)


def rates(rng: random.Random, base: float) -> Rates:
    up = base * 2 ** rng.uniform(-11, 11)
    return Rates(up=up, dn=base * 2 ** rng.uniform(-11, 11), L=rng.uniform(0, 30),
                 phi=rng.choice([1.0, 0.7, 0.3, 0.1]), tup=up * 2 ** rng.uniform(0, 7))


def some_state(rng: random.Random, g: CostGraph) -> ServerState | None:
    ws = sorted(g.weights)
    if not ws or rng.random() < 0.3:
        return None
    held = frozenset(rng.sample(ws, rng.randint(1, len(ws))))
    left = [w for w in ws if w not in held]
    return ServerState(held=held, in_flight={w: rng.randint(0, g.weights[w]) for w in left[:1]})


def test_shares_and_rates_default_to_one_uplink_share():
    s = Shares(compute=0.5, uplink=0.25)
    assert s.tensor == 0.25 and s.to_dict() == {"compute": 0.5, "uplink": 0.25}
    t = Shares(uplink=1 / 64, tensor_uplink=0.5)
    assert t.tensor == 0.5 and Shares.from_dict(t.to_dict()) == t
    with pytest.raises(CostGraphError):
        Shares(tensor_uplink=0.0)
    link = Link(20.0, rtt_ms=10.0)
    assert Rates.of(link, s).tup == Rates.of(link, s).up == 20.0 * 125.0 * 0.25
    r = Rates.of(link, t)
    assert r.up == pytest.approx(20.0 * 125.0 / 64) and r.tup == pytest.approx(20.0 * 125.0 * 0.5)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_compiled_evaluation_is_the_simulator_with_a_tensor_share(seed):
    """``online.evaluate`` / ``evaluate_shared`` equal ``simulate.run`` / ``uecpu.run_shared`` with the cut
    tensors faster than the weights (plain and CPU-shared, every mode), and the lower bound stays below."""
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
            sref, steal = run_shared(P, m, r, s, mode, state)
            sgot, gsteal = evaluate_shared(cp, r, s, mode, state, weight_bytes=P.weight_bytes)
            assert close(sgot.latency_ms, sref.latency_ms), (mode, "shared")
            assert close(sgot.ue_finish_ms, sref.ue_finish_ms) and close(gsteal, steal)
            if mode != "serial":
                lb = lower_bound(cp, r, mode="cold" if mode == "cold" else "warm", state=state,
                                 weight_bytes=P.weight_bytes)
                assert lb <= ref.latency_ms * (1 + 1e-9) + 1e-9, (mode, lb, ref.latency_ms)


@pytest.mark.parametrize("seed", range(12))
def test_warm_prediction_is_at_the_tensor_share(seed):
    """A warm request sends only cut tensors: its prediction at (uplink u, tensor t) is the one at uplink t,
    with and without the UE's CPU cost of sending, and never above the one at u alone (cold: between)."""
    rng = random.Random(seed)
    g = small_dag(seed)
    P = prepare(g)
    link = Link(rng.choice([5.0, 20.0, 100.0]), rtt_ms=rng.uniform(1, 40))
    narrow, wide = 1 / 64, rng.choice([0.25, 0.5, 1.0])
    both = Shares(uplink=narrow, tensor_uplink=wide)
    for m in list(partitions(P, limit=200))[1:8]:
        ops = P.names_of(m)
        for cpu in (None, UeCpu(send_ms_per_byte=1e-5, shared=True)):
            got = simulate_cpu(g, link, ops, cpu, mode="warm", share=both).latency_ms
            assert close(got, simulate_cpu(g, link, ops, cpu, mode="warm", share=Shares(uplink=wide)).latency_ms)
            assert got <= simulate_cpu(g, link, ops, cpu, mode="warm", share=Shares(uplink=narrow)).latency_ms + 1e-9
            cold = simulate_cpu(g, link, ops, cpu, share=both).latency_ms
            assert cold <= simulate_cpu(g, link, ops, cpu, share=Shares(uplink=narrow)).latency_ms + 1e-9
            assert cold >= simulate_cpu(g, link, ops, cpu, share=Shares(uplink=wide)).latency_ms - 1e-9


@pytest.mark.parametrize("seed", range(10))
def test_exact_search_and_the_online_table_with_a_tensor_share(seed):
    """mjoa's branch and bound (its bounds count tensors at the tensor rate) finds the exhaustive optimum,
    and the table's vectorised cold bounds stay below every candidate's evaluation."""
    rng = random.Random(seed)
    g = small_dag(seed)
    P = prepare(g)
    base = (sum(P.weight_bytes.values()) or 1) / max(sum(P.a), 1e-9)
    table = precompute(g, use_cache=False)
    for _ in range(3):
        r = rates(rng, base)
        state = some_state(rng, g)
        for mode in ("cold", "warm"):
            res = tree_search(P, r, mode, state if mode == "cold" else None, budget_s=30.0)
            _, opt, _ = optimal_enum(P, r, mode, state if mode == "cold" else None)
            assert res.exact and close(res.value, opt, 1e-7), (seed, mode, res, opt)
        lbs = table._cold_bounds(r, 1.0, 1.0, state)
        for lb, cp in zip(lbs, table.candidates, strict=True):
            assert lb <= evaluate(cp, r, "cold", state, weight_bytes=P.weight_bytes).latency_ms + 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_the_tables_split_costs_are_the_simulators_with_a_tensor_share(seed):
    """``OnlineTable.split_ms`` (gradual offloading's per-split costs) and ``suffix_targets``' terms equal
    :func:`partitioner.simulate.split_costs`, whose cut tensors go at the tensor share ``tup``."""
    from partitioner.simulate import split_costs

    rng = random.Random(seed)
    g = small_dag(seed)
    P = prepare(g)
    base = (sum(P.weight_bytes.values()) or 1) / max(sum(P.a), 1e-9)
    table = precompute(g, use_cache=False)
    for _ in range(3):
        r = rates(rng, base)
        got, want = table.split_ms(P, r), split_costs(P, r)
        assert all(close(x, y, 1e-9) for x, y in zip(got, want, strict=True)), (seed, r, got, want)


def test_a_narrow_ue_plans_its_warm_request_at_the_request_share():
    """The offload plan of a UE holding every weight, at the 1/64 floor for weights and 1/2 for cut tensors
    (ARA's narrow UE, session 10): predicted at the request share, far below the floor's prediction."""
    g = small_dag(3)
    link = Link(20.0, rtt_ms=10.0)
    held = ServerState(held=frozenset(g.weights))
    at_floor = planning.choose("offload", g, link, state=held, share=Shares(uplink=1 / 64))
    split = planning.choose("offload", g, link, state=held, share=Shares(uplink=1 / 64, tensor_uplink=0.5))
    at_half = planning.choose("offload", g, link, state=held, share=Shares(uplink=0.5))
    assert split.server_ops == at_half.server_ops == at_floor.server_ops
    assert split.predicted_ms == pytest.approx(at_half.predicted_ms)
    assert split.predicted_ms < at_floor.predicted_ms
