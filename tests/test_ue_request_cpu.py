"""What the device runtime keeps between requests to spend less CPU per request (issue 12,
``bench/bench_ue_request_cpu.py``) gives what computing it afresh gives: splits, programs, the uplink's need
order, the server's view, the link, the waiting rule, the server's op timings, the first input signature."""

from __future__ import annotations

import random
import statistics
from dataclasses import replace

import pytest
import torch

from edge_server.testing import ServerThread
from modelgraph import run_graph, zoo
from modelgraph.execute import PROGRAM_CACHE, Program
from modelgraph.graph import SPLIT_CACHE
from partitioner.costgraph import chain as cchain
from profiler.link import LinkEstimator, sample_std
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.values import OpTime
from ue_client import CoinferClient, new_tenant, wire
from ue_client import model as ue_model
from ue_client.calibration import CostModel
from ue_client.deadline import patience, patience_of


def _closed_splits(g, n: int, seed: int = 0) -> list[frozenset[str]]:
    rng = random.Random(seed)
    names = [op.name for op in g.ops]
    return [frozenset(names[rng.randrange(len(names) + 1):]) for _ in range(n)]


def test_cached_split_equals_a_fresh_one_and_the_cache_is_bounded():
    g = ue_model.prepare_model("torchvision:resnet18").graph
    for server in [*_closed_splits(g, 40), frozenset()]:
        s = g.split(server)
        assert g.split(list(server)) is s  # the same object the second time
        assert s == g._split(server)  # equal to a fresh computation
    assert len(g._splits) <= SPLIT_CACHE
    names = [op.name for op in g.ops]
    for k in range(len(names) - SPLIT_CACHE - 5, len(names)):  # more distinct splits than the cache keeps
        g.split(names[k:])
    assert len(g._splits) <= SPLIT_CACHE
    with pytest.raises(Exception, match="not closed"):
        g.split(names[:1])
    assert frozenset(names[:1]) not in g._splits  # a refused split is not kept


def test_cached_program_gives_the_same_outputs():
    module, example = zoo.diamond()
    g = ue_model.prepare_model(module, example).graph
    first = run_graph(g, example)
    progs = dict(g.__dict__.get("_programs", {}))
    assert progs and all(isinstance(p, Program) for p in progs.values())
    again = run_graph(g, example)  # the cached program: its intermediates freed as before, same result
    assert torch.equal(first, again) and dict(g.__dict__["_programs"]) == progs
    assert torch.equal(again, module(*example)) or torch.allclose(again, module(*example), atol=1e-5)
    assert PROGRAM_CACHE >= 2


def test_op_times_decode_on_first_look_and_equal_a_tuple():
    ops = [pb.OpTiming(name=f"op{i}", start_ms=0.5 * i, ms=0.25) for i in range(5)]
    r = pb.SessionResponse(request_done=pb.RequestDone(request_id=3, output_names=["y"],
                                                       timings=pb.ServerTimings(total_ms=2.0, ops=ops)))
    ev = wire.decode_event(pb.SessionResponse.FromString(r.SerializeToString()))
    want = tuple(OpTime(f"op{i}", 0.5 * i, 0.25) for i in range(5))
    assert len(ev.timings.ops) == 5 and ev.timings.ops[2] == want[2]
    assert ev.timings.ops == want and list(ev.timings.ops) == list(want) and hash(ev.timings.ops) == hash(want)
    assert [o.name for o in ev.timings.ops] == [f"op{i}" for i in range(5)]
    empty = wire.decode_event(pb.SessionResponse(request_done=pb.RequestDone(request_id=1)))
    assert empty.timings.ops == ()


def test_float_std_equals_statistics():
    rng = random.Random(1)
    for _ in range(200):
        xs = [rng.uniform(-1e3, 1e3) for _ in range(rng.randrange(2, 40))]
        assert sample_std(xs) == pytest.approx(statistics.stdev(xs), rel=1e-12, abs=1e-12)
        assert sample_std(xs, statistics.fmean(xs)) == pytest.approx(statistics.stdev(xs), rel=1e-12, abs=1e-12)


def test_transport_stats_follow_every_residual():
    cm = CostModel()
    assert cm.transport_ms == 0.0 and cm.transport_sd_ms() is None
    xs = []
    for i in range(40):
        x = (i * 37 % 11) - 3.5
        cm.calibrate_transport(x, 0.0)
        xs = [*xs, x][-32:]
        # the mean once two residuals are in (``MIN_TRANSPORT_SAMPLES``), 0 before
        assert cm.transport_ms == (pytest.approx(statistics.fmean(xs)) if len(xs) >= 2 else 0.0)
        sd = cm.transport_sd_ms()
        assert (sd is None) if len(xs) < 4 else sd == pytest.approx(statistics.stdev(xs))


def test_split_spread_and_patience_of_equal_the_rescaled_graph():
    costs = cchain([(10.0 + i, 2.0, 1000, 1000) for i in range(8)], input_bytes=1000)
    costs = replace(costs, ops=tuple(replace(o, ue_var=0.5 + i, server_var=0.1 * i) for i, o in enumerate(costs.ops)))
    cm = CostModel(costs)
    cm.scale.update(ue=1.7, server=0.6)
    names = tuple(o.name for o in costs.ops)
    split = type("S", (), {"ue_order": names[:3], "server_order": names[3:]})()
    var, server_ms = cm.split_spread(split.ue_order, split.server_order)
    assert cm.split_spread(split.ue_order, split.server_order) == (var, server_ms)  # cached sums, same result
    scaled = cm.costs  # rebuilt at these scales
    for share, dl in ((0.5, None), (1.0, None), (0.3, 250.0)):
        a = patience(scaled, split, 90.0, share=share, min_stall_ms=20.0, deadline_ms=dl)
        b = patience_of(var, server_ms, 90.0, share=share, min_stall_ms=20.0, deadline_ms=dl)
        assert a.expected_s == pytest.approx(b.expected_s) and a.stall_s == pytest.approx(b.stall_s)
        assert a.hard_s == b.hard_s
    assert cm.base_ms("server", split.server_order) == pytest.approx(sum(o.server_ms for o in costs.ops[3:]))
    assert cm.base_ms("ue", list(split.ue_order)) == pytest.approx(sum(o.ue_ms for o in costs.ops[:3]))


def test_link_is_the_same_object_until_the_estimate_moves():
    est = LinkEstimator()
    a = est.link()
    assert est.link() is a
    est.observe_rtt(7.0)
    b = est.link()
    assert b is not a and b.rtt_ms == pytest.approx(7.0) and est.link() is b


def test_first_signature_fast_path_and_cached_state_track_a_real_session():
    """A real server: requests with the example's shapes take the first graph (the fast path), another
    batch size still gets its own; the cached server state moves when the server acknowledges weights."""
    module, example = zoo.chain()
    with ServerThread() as srv, CoinferClient(module, example, server=srv.address, policy="offload",
                                              tenant=new_tenant()) as c:
        eng = c.engine
        s0 = eng.server_state()
        assert eng.server_state() is s0  # nothing moved: the same object
        x = example[0].clone()
        y = c(x)
        assert torch.equal(y, c.reference(x)) and c.last_report.server_ops > 0
        assert eng.wait_uploads(30)
        s1 = eng.server_state()
        assert s1.held and s1.held != s0.held  # the acknowledgements moved it
        assert s1.held == frozenset(n for sha, names in eng.uploads.sha_names.items()
                                    if sha in eng.uploads.held_shas() for n in names)
        for _ in range(3):
            assert torch.equal(c(x.clone()), c.reference(x))
        assert not c._engines  # the example's signature: no other engine
        big = torch.randn(3, *x.shape[1:])
        assert torch.equal(c(big), c.reference(big)) and len(c._engines) == 1
        split = eng.graph.split(frozenset(op.name for op in eng.graph.ops))
        assert eng.uploads.needed_items(split) == []  # all held


def test_bind_of_plain_positional_tensors_equals_the_tree_walk():
    """``ModelGraph.bind`` skips the pytree walk for positional tensors: same env, same layout fix, same
    errors; other input structures take the walk."""
    from modelgraph.errors import InputSpecError
    from modelgraph.pytree_io import flatten_inputs

    g = ue_model.prepare_model("torchvision:resnet18").graph
    assert g._plain_inputs is not None
    x = torch.randn(1, 3, 224, 224)
    for arg in (x, x.to(memory_format=torch.channels_last), x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
        a, b = g.bind((arg,)), flatten_inputs(g.io, g.inputs, (arg,), None)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].stride() == b[k].stride() for k in a)
    for bad in ((x.double(),), (x[:, :2],), (x, x), ([x],)):
        with pytest.raises(InputSpecError) as fast:
            g.bind(bad)
        with pytest.raises(InputSpecError) as walk:
            flatten_inputs(g.io, g.inputs, bad, None)
        assert str(fast.value) == str(walk.value)
