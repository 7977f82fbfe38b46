"""``auto``'s cold strategy (``ue_client.planning.choose``): never offload, invest now (the warm target cold in
this request) or prefetch (this request local while the target's weights go up, the target from the next one).

1. On a synthetic chain whose numbers give the answer, ``auto`` takes the strategy of least stream total by the
   model's own predictions (each total recomputed here from the simulator, ``partitioner.uecpu.simulate_cpu``),
   and the same graph with a dearer send cost flips it from prefetching to investing.
2. A logged real case, session 14's grid (``docs/results/full/session14/logs/ue2.json``, resnet18, UE 10 %,
   400 Mbit/s, RTT 20 ms, K = 8): request 1 invested ("8 requests 1386 ms with the warm target's upload vs
   3845 ms without") where ``partitioner.streambound``'s table said "local x1, 43.3 MB ahead, remote from #2".
   Replayed offline from the UE's inputs (the kept resnet18 cost graph scaled to the row's local and server
   predictions; the stream's probed send cost): the same decision and totals; the prefetch candidate was
   weighed and lost on the probe's send cost (16.4 ms/MB); with the send cost the cell's own upload measured
   (9.69 ms/MB, the bound's input) ``auto`` prefetches; and the stream bound on the UE's own inputs is
   "remote from #1" within 1 % of auto's total (session 15, coldauto: README "auto's cold strategy against the
   stream bound").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from partitioner.costgraph import CostGraph, Link, OpCost
from partitioner.state import Shares
from partitioner.streambound import Target, stream_bound
from partitioner.uecpu import SEND_SHARE, UeCpu, simulate_cpu
from ue_client import planning

DATA = Path(__file__).parent / "data" / "costgraphs"
MB = 1_000_000


def chain(n: int = 6, ue_ms: float = 160.0, server_ms: float = 25.0, weight_bytes: int = 2 * MB,
          out_bytes: int = 200_000) -> CostGraph:
    """n ops in a chain, each with one weight; input 150 kB, output 4 kB."""
    ops = []
    prev = "x"
    for i in range(n):
        ops.append(OpCost(name=f"op{i}", inputs=(prev,), weights=(f"w{i}",),
                          out_bytes=out_bytes if i < n - 1 else 4000, ue_ms=ue_ms, server_ms=server_ms))
        prev = f"op{i}"
    return CostGraph(ops=tuple(ops), inputs={"x": 150_000}, outputs=(prev,),
                     weights={f"w{i}": weight_bytes for i in range(n)})


def totals(g: CostGraph, link: Link, cpu: UeCpu, horizon: int) -> dict[str, float]:
    """Each strategy's stream total by the simulator, recomputed here: never (every request local), invest (the
    whole model on the server, cold now, warm after) and prefetch with one local request (it sends what its
    run lets the sender push, ``min(R, SEND_SHARE / s)`` bytes/ms while computing, slowed to l + s x; the next
    request cold with those weights held; warm after)."""
    server = frozenset(op.name for op in g.ops)
    local = sum(op.ue_ms for op in g.ops)
    cold = simulate_cpu(g, link, server, cpu).latency_ms
    warm = simulate_cpu(g, link, server, cpu, mode="warm").latency_ms
    s, R = cpu.send_ms_per_byte, link.uplink_mbps * 125.0
    both = min(R, SEND_SHARE / s)
    x = min(sum(g.weights.values()), both * local / (1.0 - both * s))
    state = planning.prefetched_state(None, [(f"w{i}", g.weights[f"w{i}"]) for i in range(len(g.ops))], x)
    cold_after = simulate_cpu(g, link, server, cpu, state=state).latency_ms
    return {"never": horizon * local, "invest": cold + (horizon - 1) * warm,
            "prefetch": local + s * x + cold_after + (horizon - 2) * warm}


@pytest.mark.parametrize("online", [True, False])
def test_auto_prefetches_where_the_models_own_numbers_say_it_is_cheapest(online):
    # 12 MB of weights at 100 Mbit/s take 960 ms; the UE's local run is 960 ms and sending costs it 2 ms/MB:
    # the local request carries almost the whole upload, and the stream gets one answer more than investing
    g = chain()
    link, cpu, horizon = Link(100.0, 100.0, 20.0), UeCpu(2.0 / MB), 8
    t = totals(g, link, cpu, horizon)
    assert t["prefetch"] < t["invest"] < 0.8 * t["never"], t
    c = planning.choose("auto", g, link, ue_cpu=cpu, horizon=horizon, share=Shares(1.0, 1.0), online=online)
    assert c.prefetch and not c.invest and not c.server_ops, c.reason
    assert c.reason.startswith("prefetch: 8 requests"), c.reason
    assert c.details["prefetch_requests"] == 1
    assert c.details["prefetch_total_ms"] == pytest.approx(t["prefetch"], rel=1e-6)
    assert c.details["horizon_invest_ms"] == pytest.approx(t["invest"], rel=1e-6)
    # this request: the local run slowed by what it sends
    assert c.predicted_ms == pytest.approx(sum(op.ue_ms for op in g.ops)
                                           + c.details["prefetch_bytes"] * cpu.send_ms_per_byte, rel=1e-6)


@pytest.mark.parametrize("online", [True, False])
def test_a_dearer_send_cost_makes_the_same_graph_invest(online):
    # sending at 40 ms/MB: the sender gets half the CPU while the UE computes (12.5 kB/ms), the local run doubles
    # and most of the upload is left for the next request: investing now is cheaper
    g = chain()
    link, cpu, horizon = Link(100.0, 100.0, 20.0), UeCpu(40.0 / MB), 8
    t = totals(g, link, cpu, horizon)
    assert t["invest"] < t["prefetch"] and t["invest"] < 0.8 * t["never"], t
    c = planning.choose("auto", g, link, ue_cpu=cpu, horizon=horizon, share=Shares(1.0, 1.0), online=online)
    assert c.invest and not c.prefetch and c.server_ops == frozenset(op.name for op in g.ops), c.reason
    assert c.details["horizon_invest_ms"] == pytest.approx(t["invest"], rel=1e-6)


# session 14's grid, resnet18 10 %/400 (logs/ue2.json, coinfer's stream, request 0)
LOGGED_REASON = "invest: 8 requests 1386 ms with the warm target's upload vs 3845 ms without"
LOGGED_INVEST_MS, LOGGED_STAY_MS = 1386.0, 3845.0
LOGGED_SERVER_MS = 25.866  # predicted_parts.server_ms of the all-server split (server scale 1)
LOGGED_SEND_CPU_MBPS = 488.2737115697657  # the stream's send_cpu_mbps: the worker's connect-time probe
CELL_SEND_MS_PER_MB = 9.69  # grid 14's bound table: the send cost the cell's own upload measured


def logged_case(send_ms_per_mb: float | None = None):
    g = CostGraph.from_json(DATA / "resnet18.json")
    g = g.scaled(ue=LOGGED_STAY_MS / 8 / sum(o.ue_ms for o in g.ops),
                 server=LOGGED_SERVER_MS / sum(o.server_ms for o in g.ops))
    s = send_ms_per_mb / MB if send_ms_per_mb else 1.0 / (LOGGED_SEND_CPU_MBPS * 125.0)
    return g, Link(400.0, 400.0, 20.0), UeCpu(s)


def test_the_logged_resnet18_decision_replays_and_its_prefetch_lost_on_the_probes_send_cost(monkeypatch):
    g, link, cpu = logged_case()
    seen = {}
    real = planning._prefetch_best

    def spy(*a, **k):  # (what it weighs in full: since session 34 ``choose`` cuts it short at investing now's total)
        seen["prefetch"] = real(*a, **{**k, "limit": float("inf")})
        return real(*a, **k)

    monkeypatch.setattr(planning, "_prefetch_best", spy)
    c = planning.choose("auto", g, link, ue_cpu=cpu, horizon=8, share=Shares(1.0, 1.0))
    assert c.invest and len(c.server_ops) == len(g.ops), c.reason
    assert c.details["horizon_stay_ms"] == pytest.approx(LOGGED_STAY_MS, rel=1e-3)
    assert c.details["horizon_invest_ms"] == pytest.approx(LOGGED_INVEST_MS, rel=0.02)  # the kept graph, rescaled
    pf = seen["prefetch"]  # weighed, and dearer by > 15 %: its local request runs beside a sender at half the CPU
    assert pf is not None and pf["requests"] == 1
    assert pf["total_ms"] > 1.15 * c.details["horizon_invest_ms"]
    assert pf["now_ms"] == pytest.approx(2 * c.local_ms, rel=0.01)
    # on its own inputs the stream bound says the same strategy, within 1 % of auto's total
    b = stream_bound(8, c.local_ms, [Target(sum(g.weights.values()), c.details["target_warm_ms"])], 400.0, 20.0,
                     cpu.send_ms_per_byte)
    assert b.first_remote == 1
    assert b.total_ms <= c.details["horizon_invest_ms"] <= 1.01 * b.total_ms


def test_the_logged_resnet18_case_prefetches_at_the_send_cost_its_upload_measured():
    g, link, cpu = logged_case(CELL_SEND_MS_PER_MB)
    c = planning.choose("auto", g, link, ue_cpu=cpu, horizon=8, share=Shares(1.0, 1.0))
    assert c.prefetch and not c.server_ops, c.reason
    assert c.details["prefetch_requests"] == 1
    assert c.details["prefetch_total_ms"] < c.details["horizon_invest_ms"]
    b = stream_bound(8, c.local_ms, [Target(sum(g.weights.values()), c.details["target_warm_ms"])], 400.0, 20.0,
                     cpu.send_ms_per_byte)
    assert b.first_remote == 2  # the bound's strategy too, and auto's total within 2 % of it
    assert b.total_ms <= c.details["prefetch_total_ms"] <= 1.02 * b.total_ms
