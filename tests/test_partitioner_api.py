"""The public API: plan(), the registry, plan_table's JSON, bad input, progressive offloading."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest

from partitioner.costgraph import CostGraph, CostGraphError, Link, OpCost, chain
from partitioner.errors import PartitionerError, PartitionError, SearchSpaceTooLarge, UnknownPolicyError
from partitioner.planners import POLICIES, plan
from partitioner.prep import prepare
from partitioner.progressive import next_request, stream
from partitioner.report import format_table, plan_table
from partitioner.simulate import simulate
from partitioner.state import ServerState, Shares
from partitioner.synthetic import random_dag

LINK = Link(20.0, 40.0, rtt_ms=10.0)
OPTS = {"robust": {"deadline_ms": 1e6}}


def test_unknown_policy_lists_valid_names():
    with pytest.raises(UnknownPolicyError) as e:
        plan("bogus", chain([(1, 1, 1, 1)]), LINK)
    for name in POLICIES:
        assert name in str(e.value)


@pytest.mark.parametrize("seed", range(12))
def test_every_policy_returns_a_valid_partition_no_better_than_optimal(seed):
    g = random_dag(seed, 10, pinned_prob=0.15)
    opt = plan("optimal", g, LINK)
    P = prepare(g)
    for name in POLICIES:
        p = plan(name, g, LINK, **OPTS.get(name, {}))
        m = P.mask_of(p.server_ops)
        for i in range(P.n):
            if m >> i & 1:
                assert not P.pinned[i]
                assert all(m >> s & 1 for s in P.succs[i])
        assert p.cold_ms >= opt.cold_ms - 1e-9, name
        assert p.warm_ms <= p.cold_ms + 1e-9
        sim = simulate(g, LINK, p.server_ops, timeline=False)
        if p.frequency_ghz is None:  # robust scores at its chosen (lower) frequency
            assert p.cold_ms == pytest.approx(sim.latency_ms)
        assert p.upload_order == sim.upload_order
        assert set(p.upload_order) == {w for w in p.upload_order if w in g.weights} | {
            t for t in p.upload_order if t not in g.weights}
        json.dumps(p.to_dict())


def test_plan_table_shape_and_text():
    g = random_dag(3, 9).with_server_speedup(8.0)
    t = plan_table(g, LINK, "all", options=OPTS)
    assert set(t) >= {"model", "ops", "plans"}
    assert [r["policy"] for r in t["plans"]] == list(POLICIES)
    keys = {"policy", "predicted_ms", "cold_ms", "warm_ms", "decision_ms", "server_ops", "upload_bytes",
            "sent_tensor_bytes"}
    for r in t["plans"]:
        assert keys <= set(r)
    json.dumps(t)
    text = format_table(t)
    assert "what-if" in text and "mjoa" in text
    t2 = plan_table(g, LINK, ["local", "robust"])
    assert t2["plans"][1]["feasible"] is False and "deadline" in t2["plans"][1]["reason"]
    with pytest.raises(UnknownPolicyError):
        plan_table(g, LINK, "local,nope")


def test_bad_inputs_are_clear_errors():
    with pytest.raises(CostGraphError, match="later op"):
        CostGraph(ops=(OpCost("a", ("b",)), OpCost("b", ("a",))), inputs={}, outputs=("b",))
    with pytest.raises(CostGraphError, match="invalid ue_ms"):
        chain([(-1.0, 1.0, 1, 1)])
    with pytest.raises(CostGraphError, match="invalid server_ms"):
        chain([(1.0, math.nan, 1, 1)])
    with pytest.raises(CostGraphError, match="bandwidth"):
        Link(0.0)
    with pytest.raises(CostGraphError, match="non-finite"):
        plan("dads", chain([(math.inf, 1.0, 1, 1)]), LINK)
    g = chain([(1, 1, 10, 10), (1, 1, 10, 10)])
    with pytest.raises(PartitionError, match="predecessor-closed"):
        simulate(g, LINK, ["op0"])
    with pytest.raises(PartitionError, match="not an op"):
        simulate(g, LINK, ["nope"])
    with pytest.raises(PartitionerError, match="deadline_ms"):
        plan("robust", g, LINK)
    with pytest.raises(PartitionerError, match="unexpected keyword"):
        plan("dads", g, LINK, budget_s=1)
    with pytest.raises(SearchSpaceTooLarge):
        plan("optimal", random_dag(1, 60, "random"), LINK, limit=50)
    with pytest.raises(CostGraphError, match="share"):
        Shares(0.0, 1.0)
    pinned = CostGraph(ops=(OpCost("a", ("x",), ue_ms=1), OpCost("b", ("a",), ue_ms=1, offloadable=False)),
                       inputs={"x": 1}, outputs=("b",))
    with pytest.raises(PartitionError, match="pinned"):
        simulate(pinned, LINK, ["b"])
    assert plan("offload", pinned, LINK).server_ops == frozenset()


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d["ops"][0].update(ue_ms=True), "invalid ue_ms=True"),
    (lambda d: d["ops"][1].update(server_var=False), "invalid server_var=False"),
    (lambda d: d["ops"][1].update(out_bytes=True), "invalid out_bytes=True"),
    (lambda d: d["ops"][1].update(server_ms="3"), "invalid server_ms='3'"),
    (lambda d: d["weights"].update(w0=True), "weight 'w0' has size True"),
    (lambda d: d["inputs"].update(x=True), "input 'x' has size True"),
    (lambda d: d.update(ue_samples_ms=[[1.0, True], [1.0, 1.0]]), "ue_samples_ms of op 'op0' has True"),
    (lambda d: d["ops"][0].update(offloadable=0), "offloadable=0"),
], ids=["ue_ms", "server_var", "out_bytes", "string", "weight", "input", "sample", "offloadable"])
def test_a_json_boolean_where_a_number_is_expected_is_refused(tmp_path, edit, needle):
    """The client-side loader (``CostGraph.from_json``, a file or text): ``"ue_ms": true`` was a 1 ms op
    (a Python bool is an int). The server refuses the same through ``profile_intake.cost_graph_of``."""
    d = chain([(1.0, 1.0, 10, 10), (2.0, 1.0, 10, 10)], input_bytes=4).to_dict()
    edit(d)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(d))
    for source in (json.dumps(d), path):
        with pytest.raises(CostGraphError, match=re.escape(needle)):
            CostGraph.from_json(source)
    with pytest.raises(CostGraphError, match="invalid ue_ms=True"):  # built in code, the same rule
        CostGraph(ops=(OpCost("a", ("x",), ue_ms=True),), inputs={"x": 1}, outputs=("a",))
    with pytest.raises(CostGraphError, match="must be a number"):
        Link(True)


def test_json_round_trips():
    g = random_dag(9, 12, samples=5)
    assert CostGraph.from_json(g.to_json()).to_dict() == g.to_dict()
    s = ServerState(held=frozenset({"w1"}), in_flight={"w2": 10})
    assert ServerState.from_json(s.to_json()) == s
    assert Shares.from_dict(Shares(0.5, 0.25).to_dict()) == Shares(0.5, 0.25)


def test_state_and_share_change_the_plan_latency():
    g = random_dag(4, 10, "heavy_tail", speedup=30.0)
    cold = plan("optimal", g, LINK)
    warm = plan("optimal", g, LINK, state=ServerState.warm(g))
    assert warm.cold_ms <= cold.cold_ms
    assert warm.upload_bytes == 0
    half = plan("optimal", g, LINK, state=ServerState.warm(g), share=Shares(0.5, 0.5))
    assert half.cold_ms >= warm.cold_ms - 1e-9


def test_progressive_stream_converges_to_warm_target():
    g = random_dag(12, 12, "heavy_tail", speedup=30.0)
    link = Link(300.0, rtt_ms=2.0)
    pts = stream(g, link, 10, gap_ms=300.0, budget_s=2.0)
    lats = [p.latency_ms for p in pts]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(lats))
    step = next_request(g, link, ServerState.warm(g), budget_s=2.0)
    assert lats[-1] == pytest.approx(step.plan.cold_ms)
    assert lats[0] > lats[-1]


def test_progressive_background_order_is_target_need_order():
    g = random_dag(11, 12, "heavy_tail", speedup=20.0)
    step = next_request(g, Link(100.0, rtt_ms=4.0), ServerState(), budget_s=2.0)
    assert not set(step.background) & set(step.plan.upload_order)
    idx = {w: min(i for i, op in enumerate(g.ops) if w in op.weights) for w in step.background}
    order = [idx[w] for w in step.background]
    assert order == sorted(order)


def test_mjoa_heuristic_on_large_graph_is_valid_and_bounded():
    g = random_dag(2, 600, "branches", speedup=10.0)
    p = plan("mjoa", g, Link(50.0, rtt_ms=5.0), budget_s=0.5)
    assert p.decision_ms < 3000
    assert p.cold_ms <= plan("local", g, Link(50.0, rtt_ms=5.0)).cold_ms + 1e-9
    assert p.cold_ms <= plan("dads", g, Link(50.0, rtt_ms=5.0)).cold_ms + 1e-9
