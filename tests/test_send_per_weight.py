"""The UE's send cost per weight as well as per byte (``partitioner.uecpu.UeCpu.send_ms_per_weight``): offline,
on the simulator. A weight's bytes cost ``send_ms_per_byte + send_ms_per_weight x weights / bytes`` of the
upload they belong to (``weight_byte_cost``); cut tensors cost the per-byte rate alone."""

from __future__ import annotations

import pytest

from partitioner.costgraph import CostGraphError, Link
from partitioner.prep import prepare
from partitioner.simulate import _weights_needed
from partitioner.state import ServerState
from partitioner.uecpu import UeCpu, simulate_cpu, weight_byte_cost
from tests.test_partitioner_uecpu import LINKS, cases, chain, close, state_for


def test_no_per_weight_cost_is_the_per_byte_model() -> None:
    """``send_ms_per_weight = 0`` gives what the per-byte model gave, in every mode, on random DAGs, links,
    held sets and send costs."""
    for k, (g, P, m) in enumerate(cases(range(40), per=2)):
        names = P.names_of(m)
        st = state_for(P, m, k)
        for link in LINKS[1:3]:
            for s in (2e-6, 5e-5):
                for mode in ("cold", "serial", "warm"):
                    a = simulate_cpu(g, link, names, UeCpu(s), mode=mode, state=st)
                    b = simulate_cpu(g, link, names, UeCpu(s, send_ms_per_weight=0.0), mode=mode, state=st)
                    assert a == b


def test_serial_upload_on_a_cpu_bound_uplink_pays_each_weight() -> None:
    """Serial, every op on the server, the uplink far above the CPU-bound rate: the upload takes its bytes' CPU
    plus ``send_ms_per_weight`` per weight, exactly (the request after it is the same)."""
    g = chain(n=6, wbytes=1_000_000)
    link = Link(100_000.0, rtt_ms=2.0)
    names = [op.name for op in g.ops]
    s, sw = 2e-5, 3.0
    base = simulate_cpu(g, link, names, UeCpu(s), mode="serial")
    got = simulate_cpu(g, link, names, UeCpu(s, send_ms_per_weight=sw), mode="serial")
    assert close(got.latency_ms - base.latency_ms, 6 * sw)
    # a held weight is not sent: neither its bytes nor its per-weight cost
    P = prepare(g)
    st = ServerState(held=frozenset({"w5"}))
    assert len(_weights_needed(P, list(range(P.n)), st)) == 5
    base_h = simulate_cpu(g, link, names, UeCpu(s), mode="serial", state=st)
    got_h = simulate_cpu(g, link, names, UeCpu(s, send_ms_per_weight=sw), mode="serial", state=st)
    assert close(got_h.latency_ms - base_h.latency_ms, 5 * sw)


def test_a_parallel_upload_beside_the_prefix_is_slowed_by_the_per_weight_cost() -> None:
    """Cold, a split whose upload overlaps the UE's prefix on a shared CPU: the per-weight cost takes more of
    the prefix's CPU (``steal_ms``) and the latency does not fall; both grow with it."""
    g = chain(n=8, ue_ms=40.0, wbytes=500_000)
    link = Link(400.0, rtt_ms=20.0)
    server = [op.name for op in g.ops[4:]]
    last = None
    for sw in (0.0, 0.5, 2.0, 8.0):
        got = simulate_cpu(g, link, server, UeCpu(1e-5, send_ms_per_weight=sw), mode="cold")
        if last is not None:
            assert got.steal_ms > last.steal_ms and got.latency_ms >= last.latency_ms - 1e-9
        last = got


def test_weight_byte_cost_and_the_value_checks() -> None:
    assert weight_byte_cost(1e-5, 0.0, 10, 1e6) == 1e-5
    assert weight_byte_cost(1e-5, 2.0, 0, 1e6) == 1e-5
    assert close(weight_byte_cost(1e-5, 2.0, 10, 1e6), 1e-5 + 2e-5)
    cpu = UeCpu(1e-5, send_ms_per_weight=0.2)
    slow = cpu.at_factor(3.0)
    assert close(slow.send_ms_per_byte, 3e-5) and close(slow.send_ms_per_weight, 0.6)
    assert cpu.to_dict()["send_ms_per_weight"] == 0.2
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(CostGraphError, match="send_ms_per_weight"):
            UeCpu(1e-5, send_ms_per_weight=bad)
