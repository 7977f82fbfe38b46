"""ARA believes a UE's claimed server costs only as far as the server's own measurements allow.

A UE's cost graph is its claim. Before this check a UE claiming every op 100x dearer on the server took
ARA's compute share 0.91 from an honest UE of another tenant with the same model (phi_n grows with
sqrt(w_n C_n)); the server now times every op it runs for the session (``ServerTimings.ops``) and plans
the session with its measurements once the claims exceed them by more than ``CLAIM_SLACK``."""

from __future__ import annotations

import json

import pytest

from edge_server.allocation import CLAIM_SLACK, AraShareAllocator, calibrate_server_costs
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from modelgraph import zoo
from partitioner import CostGraph, chain
from tests.waiting import wait_until
from ue_client import wire
from ue_client.client import CoinferClient
from ue_client.options import ClientOptions

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB)


def test_calibration_replaces_inflated_claims_and_keeps_honest_ones() -> None:
    g = chain([(5.0, 2.0, 1000, 100), (5.0, 4.0, 1000, 100), (5.0, 6.0, 1000, 100)])
    names = [op.name for op in g.ops]
    # honest within the slack: unchanged
    same, r = calibrate_server_costs(g, {names[0]: 2.0 * 1.5, names[1]: 4.0 / 1.5})
    assert same is g and r == 1.0
    # claims 10x what ran: measured ops get the measurement, the op never run its claim x r
    lied = g.with_server_costs({n: op.server_ms * 10 for n, op in zip(names, g.ops)})
    fixed, r = calibrate_server_costs(lied, {names[0]: 2.0, names[1]: 4.0})
    assert r == pytest.approx(0.1)
    assert [op.server_ms for op in fixed.ops] == pytest.approx([2.0, 4.0, 6.0])
    # understated claims are kept (they only shrink the UE's own share); nothing measured: unchanged
    assert calibrate_server_costs(g, {names[0]: 2.0 * CLAIM_SLACK * 3})[1] == 1.0
    assert calibrate_server_costs(g, {})[1] == 1.0
    # ops ran that the claim does not name (12 ms of them): judged against the whole claim (12 of 120)
    renamed, r = calibrate_server_costs(lied, {}, unnamed_ms=12.0)
    assert r == pytest.approx(0.1)
    assert [op.server_ms for op in renamed.ops] == pytest.approx([2.0, 4.0, 6.0])
    assert calibrate_server_costs(g, {}, unnamed_ms=12.0)[1] == 1.0  # an honest whole claim stands


def _inflating(factor: float):
    """``wire.UeProfile`` whose cost graph claims every server cost ``factor`` x what the UE was told."""
    real = wire.UeProfile

    def make(cost_graph_json, *args, **kwargs):
        if cost_graph_json:
            g = CostGraph.from_dict(json.loads(cost_graph_json))
            cost_graph_json = g.with_server_costs({op.name: op.server_ms * factor for op in g.ops}).to_json()
        return real(cost_graph_json, *args, **kwargs)

    return make


def _client(address: str, tenant: str) -> CoinferClient:
    return CoinferClient(zoo.spec("chain"), server=address,
                         options=ClientOptions(policy="offload", tenant=tenant, probe=False, profile_runs=3))


def _inflating_renamed(factor: float):
    """As :func:`_inflating`, and every op of the claimed graph renamed (``x_`` + its name; inputs and
    outputs follow): a claim that names none of the ops the server runs for the session."""
    real = wire.UeProfile

    def make(cost_graph_json, *args, **kwargs):
        if cost_graph_json:
            d = json.loads(cost_graph_json)
            ops = {op["name"] for op in d["ops"]}
            ren = {n: "x_" + n for n in ops}
            for op in d["ops"]:
                op["name"] = ren[op["name"]]
                op["inputs"] = [ren.get(i, i) for i in op["inputs"]]
                op["server_ms"] *= factor
            d["outputs"] = [ren.get(o, o) for o in d["outputs"]]
            cost_graph_json = json.dumps(d)
        return real(cost_graph_json, *args, **kwargs)

    return make


@pytest.mark.parametrize("inflating", ["named", "renamed"])
def test_inflated_server_costs_lose_their_share_once_the_server_ran_the_ops(monkeypatch, inflating) -> None:
    """named: the claim names the ops the server runs. renamed: the calibration matched the server's timings
    to the claim by op name, and a liar whose graph names its ops otherwise than its slice (the server never
    checks the graph against the slice) kept its 100x claim and ~10 / 11 of the server however many of its
    ops the server ran (0.91 after 3 requests); now the whole claim is compared with what ran."""
    model, inputs = zoo.chain()
    alloc = AraShareAllocator(policy="offload")
    profile = _inflating(100.0) if inflating == "named" else _inflating_renamed(100.0)
    with ServerThread(config=CFG, allocator=alloc) as srv, _client(srv.address, "honest") as honest:
        honest(*inputs)
        with monkeypatch.context() as m:
            m.setattr(wire, "UeProfile", profile)
            liar = _client(srv.address, "liar")
            liar.engine.connect()
        with liar:
            assert alloc.wait_idle(60)
            sid = next(s for s, info in srv.runtime.sessions.sessions.items() if info.tenant == "liar")
            before = alloc.shares()[sid]
            assert before > 0.85, before  # the claim alone: ~10 / 11 of the server
            for _ in range(3):  # the server runs the liar's ops and times them (the least time counts)
                y = liar(*inputs)
            assert liar.last_report.server_ops > 0 and not liar.last_report.fallback
            wait_until(lambda: alloc.corrections >= 1, timeout=30, what="the claims corrected")
            assert alloc.wait_idle(60)
            after = alloc.shares()[sid]
            assert after < 0.7, (before, after)
            assert alloc.calibration(sid) < 0.1  # the 100x claim, seen
            honest_sid = next(s for s in alloc.shares() if s != sid)
            # its claims are this server's own profile: believed (1.0), or, when the profile ran under more load
            # than its requests (two busy loops beside the test: 0.22), planned at what the server measured, as
            # the liar is: its share then follows its true work; never anywhere near the 100x liar's correction
            assert alloc.calibration(honest_sid) >= 0.1, alloc.calibration(honest_sid)
            assert (y == model(*inputs)).all()
