"""The baselines' predictions through compiled partitions (``partitioner.online.predictor``) are the simulator's.

``planning.choose`` for a policy that picks its split itself (``planning.COMPILED_PREDICTIONS``: ionn, dads,
neurosurgeon, cic, ...) used to predict that split with ~5 Python simulations (session 17: 1.3-4.3 ms of each
IONN re-plan on a UE). Now ``plan``'s and ``choose``'s predictions come from the compiled partition; this test
runs every such choice both ways (the compiled path, and the simulator with the set emptied) over random DAGs
and the captured resnet18 / mobilenet_v2 profiles, a grid of links, server shares, send costs and held / in-flight
sets, on calibrated copies too, and asserts the same decision: split, warm target, background, upload order and
reason equal; every prediction (latency, warm, serial, local, std and the numbers in ``details``) within 1e-9
relative.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitioner import online, planners
from partitioner.costgraph import CostGraph, Link
from partitioner.online import predictor
from partitioner.prep import prepare
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu
from tests.test_partitioner_online import DATA, SETTINGS, close, small_dag, some_state
from ue_client import planning

UNTIMED = frozenset(("compressed_now", "compress_ms"))
"""``details`` of cic's compression cache (the first call compresses, the second finds it), not predictions."""
POLICIES = ("ionn", "dads", "neurosurgeon", "cic", "offload", "local")


def same_choice(a: planning.PlanChoice, b: planning.PlanChoice, what) -> None:
    """Equal decisions: the discrete fields equal, every number within 1e-9 relative."""
    for f in ("policy", "server_ops", "upload_order", "warm_target", "background", "reason", "feasible", "invest",
              "prefetch", "gradual", "idle_only"):
        assert getattr(a, f) == getattr(b, f), (what, f, getattr(a, f), getattr(b, f))
    for f in ("predicted_ms", "warm_ms", "serial_ms", "local_ms"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None) and (x is None or close(x, y)), (what, f, x, y)
    assert a.details.keys() == b.details.keys(), (what, a.details.keys() ^ b.details.keys())
    for k, x in a.details.items():
        if k in UNTIMED:
            continue
        y = b.details[k]
        if isinstance(x, float) and isinstance(y, float):
            assert (math.isnan(x) and math.isnan(y)) or close(x, y), (what, k, x, y)
        else:
            assert x == y, (what, k, x, y)


def both(monkeypatch, policy: str, g: CostGraph, link: Link, **kw) -> tuple[planning.PlanChoice, ...]:
    """``choose`` through compiled partitions (the simulators made to fail there), then through the simulator."""
    def no_sim(*a, **k):
        raise AssertionError("simulated")

    with monkeypatch.context() as m:
        m.setattr(planning, "simulate_cpu", no_sim)
        if policy != "offload":  # (its objective is the serial simulation: the policy's own, kept)
            m.setattr(planners, "run", no_sim)
        fast = planning.choose(policy, g, link, **kw)
    with monkeypatch.context() as m:
        m.setattr(planning, "COMPILED_PREDICTIONS", frozenset())
        slow = planning.choose(policy, g, link, **kw)
    return fast, slow


def grid(rng: random.Random, g: CostGraph):
    """(link, share, ue_cpu, state) draws: uplinks over 4 decades, shares, send costs, held / in-flight sets."""
    for up in (2.0, 20.0, 200.0, 2000.0):
        link = Link(up, rtt_ms=rng.choice([1.0, 10.0, 40.0]), downlink_mbps=rng.choice([None, 50.0]))
        share = rng.choice([None, Shares(compute=0.3), Shares(compute=0.7, uplink=0.5, tensor_uplink=0.8)])
        cpu = rng.choice([None, UeCpu(send_ms_per_byte=2e-5), UeCpu(send_ms_per_byte=1e-4, shared=False)])
        yield link, share, cpu, some_state(rng, g)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_compiled_predictions_are_the_simulators_on_random_dags(seed):
    rng = random.Random(seed)
    g = small_dag(seed)
    mp = pytest.MonkeyPatch()
    try:
        for link, share, cpu, state in grid(rng, g):
            for policy in POLICIES:
                fast, slow = both(mp, policy, g, link, share=share, ue_cpu=cpu, state=state,
                                  transport_ms=rng.choice([0.0, 12.0, -5.0]))
                same_choice(fast, slow, (seed, policy, link, share, cpu, state))
    finally:
        mp.undo()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_compiled_predictions_are_the_simulators_on_captured_graphs(name, monkeypatch):
    g0 = CostGraph.from_json(DATA / f"{name}.json")
    rng = random.Random(name)
    ws = sorted(g0.weights)
    for g in (g0, g0.scaled(ue=10.0), g0.scaled(ue=10.0).scaled(ue=1.3, server=1.7)):  # calibrated copies
        states = [None, ServerState(held=frozenset(ws[len(ws) // 2:])),
                  ServerState(held=frozenset(ws[: len(ws) // 3]), in_flight={w: 100 for w in ws[len(ws) // 3:][:4]}),
                  ServerState.warm(g)]
        for up in (20.0, 400.0):
            for cpu in (None, UeCpu(send_ms_per_byte=1e-5)):
                for state in states:
                    share = rng.choice([None, Shares(compute=0.5, uplink=0.5)])
                    for policy in ("ionn", "dads", "neurosurgeon"):
                        fast, slow = both(monkeypatch, policy, g, Link(up, rtt_ms=5.0), share=share, ue_cpu=cpu,
                                          state=state, transport_ms=8.0, ue_overhead_ms=3.0)
                        same_choice(fast, slow, (name, policy, up, cpu, state and len(state.held)))


def test_calibrated_copies_share_the_base_predictor(monkeypatch):
    # no precomputed table of this profile from an earlier test of the process (``online.cached`` would return
    # it, with candidates: the test failed after tests/test_partitioner_online.py in one process)
    monkeypatch.setattr(online, "_CACHE", type(online._CACHE)())
    g = CostGraph.from_json(DATA / "resnet18.json")
    a, b = g.scaled(ue=2.0), g.scaled(ue=3.0, server=1.5)
    t = predictor(a)
    assert predictor(b) is t is predictor(g) and not t.candidates
    assert t.__dict__["_base_P"] is prepare(g)
    su, ss = t.scales(prepare(b))
    assert close(su, 3.0) and close(ss, 1.5)


def test_split_sent_bytes_is_kept_for_calibrated_copies_and_equals_a_fresh_count():
    """``simulate.split_sent_bytes`` depends on the structure alone: kept on the profile and shared by its calibrated
    copies (IONN's schedule counted it again for each), the same list as counted afresh; a caller's change to the
    list it got does not reach the kept one."""
    from partitioner import simulate

    g = CostGraph.from_json(DATA / "mobilenet_v2.json")
    a = g.scaled(ue=10.0).scaled(ue=1.3, server=0.7)
    got = simulate.split_sent_bytes(prepare(a))
    assert got == simulate._split_sent_bytes(prepare(a)) == simulate._split_sent_bytes(prepare(g))
    assert prepare(g).__dict__[simulate._SPLIT_SENT] is prepare(a).__dict__[simulate._SPLIT_SENT]
    got[0] += 1.0
    assert simulate.split_sent_bytes(prepare(g.scaled(server=2.0))) == simulate._split_sent_bytes(prepare(g))
