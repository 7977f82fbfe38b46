"""A new client starts from the transport residuals the earlier clients of its process measured with the same
server, model and planning link (``ue_client.calibration.TransportMemory``, ``ClientOptions.transport_memory``).

Session 12's warm scenario opened a new client per round (one warm-up on a new slice, three recorded requests):
each started with no residual, so 2 of every 3 recorded requests were predicted on the link model alone, the
UE's sending and receiving under its CPU quota and the server's work around its ops' compute left out (median
|pred / meas - 1| of coinfer's warm requests 15 %, signed -10 %; 16-17 % on the first two of a round, 11 % on the
third). A replay of those rows with the residuals kept per process gave 10 % (``docs/results/accuracy/session13``).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from edge_server.testing import ServerThread
from modelgraph import zoo
from ue_client.calibration import MIN_TRANSPORT_SAMPLES, SPREAD_WINDOW, CostModel, TransportMemory
from ue_client.client import CoinferClient
from ue_client.options import ClientOptions, InputError

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
GOOGLENET_10_400 = [23.46, 21.14, 19.73]
"""The transport residuals (ms) of coinfer's first warm round, googlenet, 10 % UE, 400 Mbit/s (session 12's
grid, ``docs/results/full/session12/logs``): its next round's client predicted its first two requests 139 ms
without them."""


def test_a_cost_model_with_the_same_key_starts_from_the_residuals_kept():
    mem = TransportMemory()
    first = CostModel(memory_key=("srv:1", "m", None, 1.0), memory=mem)
    assert first.transport_ms == 0.0
    for r in GOOGLENET_10_400:
        first.calibrate_transport(r, 0.0)
    again = CostModel(memory_key=("srv:1", "m", None, 1.0), memory=mem)
    assert again.transport_residuals == pytest.approx(GOOGLENET_10_400)
    assert again.transport_ms == pytest.approx(statistics.fmean(GOOGLENET_10_400))
    assert again.transport_sd_ms(2) == pytest.approx(first.transport_sd_ms(2))
    # another server, model or link: nothing; no key: nothing, and nothing kept
    for key in (("srv:2", "m", None, 1.0), ("srv:1", "other", None, 1.0), ("srv:1", "m", "link", 1.0)):
        assert CostModel(memory_key=key, memory=mem).transport_residuals == []
    alone = CostModel()
    alone.calibrate_transport(500.0, 0.0)
    assert mem.recall(("srv:1", "m", None, 1.0)) == pytest.approx(GOOGLENET_10_400)
    # the later client's residuals are kept too, the window's last SPREAD_WINDOW
    for k in range(SPREAD_WINDOW):
        again.calibrate_transport(float(k), 0.0)
    assert mem.recall(("srv:1", "m", None, 1.0)) == [float(k) for k in range(SPREAD_WINDOW)]
    assert CostModel(memory_key=("srv:1", "m", None, 1.0), memory=mem).transport_ms == pytest.approx(
        statistics.fmean(range(SPREAD_WINDOW)))


def test_a_cost_model_with_the_same_key_starts_from_the_server_scale_kept():
    """Session 14: the server's cost scale outlives the client like its residuals (the same key); the UE's
    does not (it pairs with the overhead fitted over the client's own window)."""
    mem = TransportMemory()
    key = ("srv:1", "m", None, 1.0)
    first = CostModel(memory_key=key, memory=mem)
    assert first.scale == {"ue": 1.0, "server": 1.0} and mem.recall_server_scale(key) is None
    for _ in range(3):  # measured twice the profile at the whole server: the scale moves toward 2
        first.calibrate_server(40.0, 20.0, 1.0)
        first.calibrate("ue", 30.0, 10.0)
    assert 1.5 < first.scale["server"] < 2.0 and first.scale["ue"] > 1.5
    again = CostModel(memory_key=key, memory=mem)
    assert again.scale == {"ue": 1.0, "server": first.scale["server"]}
    again.calibrate_server(20.0, 20.0, 1.0)  # the later client's own moves are kept in turn
    assert mem.recall_server_scale(key) == again.scale["server"] < first.scale["server"]
    for other in (("srv:2", "m", None, 1.0), ("srv:1", "other", None, 1.0), ("srv:1", "m", "link", 1.0)):
        assert CostModel(memory_key=other, memory=mem).scale["server"] == 1.0
    alone = CostModel()  # no key: starts at 1.0 and keeps nothing
    alone.calibrate_server(80.0, 20.0, 1.0)
    assert mem.recall_server_scale(key) == again.scale["server"]
    mem.note_server_scale(key, float("nan"))  # never a non-number
    assert mem.recall_server_scale(key) == again.scale["server"]
    mem.forget()
    assert CostModel(memory_key=key, memory=mem).scale["server"] == 1.0


def test_the_memory_is_bounded_and_seeding_replaces_the_window():
    mem = TransportMemory(keys=2)
    for k in range(3):
        CostModel(memory_key=(k,), memory=mem).calibrate_transport(10.0 * (k + 1), 0.0)
    assert mem.recall((0,)) == [] and mem.recall((1,)) == [20.0] and mem.recall((2,)) == [30.0]
    cm = CostModel(memory_key=(2,), memory=mem)
    cm.seed_transport([1.0, 2000.0])  # the testbed's explicit seed: that client's window, clamped
    assert cm.transport_residuals == [1.0, 1000.0]
    assert mem.recall((2,)) == [30.0]  # a seed is not a measurement of this client's
    mem.forget()
    assert mem.recall((2,)) == []


def test_transport_memory_is_a_bool_option():
    assert ClientOptions().transport_memory is True
    with pytest.raises(InputError, match="transport_memory"):
        ClientOptions(transport_memory="yes")


def test_a_second_client_predicts_its_first_split_request_with_the_first_clients_residuals():
    """Real server, real clients: the second client of the same server, model and link predicts its first split
    request with the residuals the first one measured (before: 0, the link model alone); with
    ``transport_memory=False`` it starts from none, as before."""
    with ServerThread(threads=1) as srv:
        opts = dict(server=srv.address, policy="offload", link=FAST, probe=False)
        with CoinferClient(zoo.spec("chain"), **opts) as first:
            x = torch.randn(*first.model.example_inputs[0].shape)
            for _ in range(1 + MIN_TRANSPORT_SAMPLES):  # the first defines the slice (no residual)
                first(x)
            kept = first.engine.cost_model.transport_residuals
            assert len(kept) == MIN_TRANSPORT_SAMPLES
        with CoinferClient(zoo.spec("chain"), **opts) as second:
            assert second.engine.cost_model.transport_residuals == pytest.approx(kept)
            second(x)
            rep = second.last_report
            assert rep.server_ops > 0 and not rep.fallback
            assert rep.predicted_parts["transport_ms"] == pytest.approx(statistics.fmean(kept))
        with CoinferClient(zoo.spec("chain"), transport_memory=False, **opts) as alone:
            assert alone.engine.cost_model.transport_residuals == []
            alone(x)
            assert alone.last_report.predicted_parts["transport_ms"] == 0.0


def test_a_reused_local_decision_predicts_at_the_ue_scale_of_now():
    """A local decision reused while the UE's cost scale moved by less than its re-plan threshold (30 %) predicts
    with the scale of now (``planning.refresh_ue_scale``): session 12's warm local requests (25 % of a core)
    kept the prediction they were planned with, +11 % median signed, while every request moved the scale."""
    from pathlib import Path

    from partitioner.costgraph import CostGraph, Link
    from partitioner.state import ServerState, Shares
    from ue_client.decisions import DecisionCache

    g = CostGraph.from_json(Path(__file__).parent / "data" / "costgraphs" / "mobilenet_v2.json").scaled(server=1e3)
    dc = DecisionCache("dads", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=None)
    link, state = Link(20.0, rtt_ms=20.0), ServerState.warm(g)
    first = dc.decide(state, Shares(), costs=g, base=g, link=link, ue_cpu=None, n=1,
                      scale={"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0})
    assert not first.server_ops and first.predicted_ms == pytest.approx(sum(o.ue_ms for o in g.ops))
    for s in (0.9, 0.8, 0.75):  # each within 30 % of the one before: reused
        c = dc.decide(state, Shares(), costs=g.scaled(ue=s), base=g, link=link, ue_cpu=None, n=2,
                      scale={"ue": s, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0})
        assert dc.why == "" and c.decision_ms == 0.0  # reused, not planned again
        assert c.predicted_ms == pytest.approx(s * first.predicted_ms)
        assert c.local_ms == pytest.approx(c.predicted_ms) and c.details["mean_ms"] == pytest.approx(c.predicted_ms)


def test_a_reused_split_predicts_at_the_server_scale_of_now():
    """A split decision reused while the server's cost scale moved by less than 30 % predicts with the server
    part of now (``planning.refresh_server_scale``), and that part is what the transport residual leaves out
    (``details["server_ms"]``): before, the prediction kept the server time it was made with while the residual
    subtracted the server time of now, so the stale part became residual (session 13, a server profiled at
    5x what it ran in: residuals of -35 to -92 ms that a new client would then have started from)."""
    from pathlib import Path

    from partitioner.costgraph import CostGraph, Link
    from partitioner.state import ServerState, Shares
    from ue_client.decisions import DecisionCache

    g = CostGraph.from_json(Path(__file__).parent / "data" / "costgraphs" / "mobilenet_v2.json").scaled(ue=50.0)
    dc = DecisionCache("dads", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=None)
    link, state = Link(400.0, rtt_ms=20.0), ServerState.warm(g)
    first = dc.decide(state, Shares(), costs=g, base=g, link=link, ue_cpu=None, n=1,
                      scale={"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0})
    srv = first.details["server_ms"]
    assert first.server_ops and srv == pytest.approx(sum(g.ops[g.index[n]].server_ms for n in first.server_ops))
    prev = first
    for s in (0.8, 0.65, 0.55):  # each within 30 % of the one before: reused
        c = dc.decide(state, Shares(), costs=g.scaled(server=s), base=g, link=link, ue_cpu=None, n=2,
                      scale={"ue": 1.0, "server": s, "ue_overhead_ms": 0.0, "transport_ms": 0.0})
        assert dc.why == "" and c.decision_ms == 0.0 and c.server_ops == first.server_ops
        assert c.details["server_ms"] == pytest.approx(s * srv)
        assert c.predicted_ms == pytest.approx(first.predicted_ms - (1 - s) * srv)
        assert c.warm_ms - prev.warm_ms == pytest.approx(c.predicted_ms - prev.predicted_ms)
        prev = c
    # what planning again at that scale predicts for the same split (a chain of server ops after the input)
    again = DecisionCache("dads", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=None).decide(
        state, Shares(), costs=g.scaled(server=0.55), base=g, link=link, ue_cpu=None, n=1,
        scale={"ue": 1.0, "server": 0.55, "ue_overhead_ms": 0.0, "transport_ms": 0.0})
    assert again.server_ops == first.server_ops
    assert prev.predicted_ms == pytest.approx(again.predicted_ms, rel=1e-6)
