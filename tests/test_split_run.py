"""What a split's requests share (``ue_client.request.SplitRun``): built once per split, it must say what the
per-request code said (cut tensors' uplink priority, inline inputs, output metadata, profiled sums), and the
outputs decoded through it must equal the server's bytes, with a missing or misshapen output a
``ProtocolError`` (the request then falls back)."""

from __future__ import annotations

import pytest
import torch

from modelgraph import capture
from modelgraph.tensors import tensor_bytes
from protos.values import ServerTimings
from ue_client import wire
from ue_client.calibration import CostModel
from ue_client.errors import ProtocolError
from ue_client.request import RequestPath, SplitRun
from ue_client.session import Pending


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x, y):
        h = torch.relu(self.a(x)) + y
        return self.b(h), h.sum(dim=1)


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return capture(Net().eval(), (torch.randn(2, 8), torch.randn(2, 16)), name="net")


def _old_need_pos(g, split) -> dict[str, int]:  # what run_split computed per request before
    pos: dict[str, int] = {}
    for k, name in enumerate(split.server_order):
        for r in g.op_by_name[name].tensor_inputs:
            pos.setdefault(r, 2 * k)
    return pos


def test_split_run_says_what_the_request_computed(graph) -> None:
    for k in range(len(graph.ops) + 1):
        split = graph.split_at(k)
        run = SplitRun(graph, split)
        assert run.split is split
        assert run.need_pos == _old_need_pos(graph, split)
        assert [r for r, *_ in run.inline] == [r for r in split.cut_tensors if r in graph.inputs]
        for ref, dtype, shape in run.inline:
            assert (dtype, shape) == (graph.inputs[ref].dtype, graph.inputs[ref].shape)
        assert [o for o, *_ in run.outputs] == list(split.server_outputs)
        for name, meta, dtype in run.outputs:
            assert meta == graph.meta_of(name) and dtype == getattr(torch, meta.dtype)


def test_split_run_sums_follow_the_cost_graph(graph) -> None:
    from partitioner import CostGraph
    from partitioner.costgraph import OpCost

    def costs(f: float) -> CostGraph:  # every op with its own times, so that each split's sums differ
        return CostGraph(ops=tuple(OpCost(op.name, (), ue_ms=f * (i + 1), server_ms=f * (i + 2), ue_var=f * i,
                                          server_var=f) for i, op in enumerate(graph.ops)),
                         inputs={}, outputs=())

    cm = CostModel(costs(1.0))
    split = graph.split_at(2)
    run = SplitRun(graph, split)
    want = (cm.base_ms("ue", split.ue_order), cm.base_ms("server", split.server_order),
            *cm.variances(split.ue_order, split.server_order))
    assert run.sums_of(cm) == want
    cm.scale["server"] = 1.7
    assert cm.spread_of(want[2], want[3], want[1]) == cm.split_spread(split.ue_order, split.server_order)
    cm.base = costs(3.0)  # another profile (a new connection measured it): the sums follow
    assert run.sums_of(cm) == tuple(3.0 * x for x in want)


def _answer(run: SplitRun, values: dict[str, torch.Tensor]) -> Pending:
    p = Pending(5, run.expected)
    outs = []
    for name, t in values.items():
        data = bytes(tensor_bytes(t))
        outs.append(wire.OutputChunk(5, name, str(t.dtype).removeprefix("torch."), tuple(t.shape), 0, len(data), data))
    timings = ServerTimings(1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    for c in outs:
        p.add(c)
    p.finish(wire.Done(5, tuple(values), timings))
    return p


def test_outputs_decoded_through_the_split_run(graph) -> None:
    split = graph.split_at(1)
    run = SplitRun(graph, split)
    x, y = torch.randn(2, 8), torch.randn(2, 16)
    env = {**dict(zip(graph.inputs, (x, y)))}
    from modelgraph import run_ue_part
    from modelgraph.execute import Program

    env = run_ue_part(graph, split, env, bound=True)
    Program(tuple(graph.op_by_name[n] for n in split.server_order), frozenset(graph.outputs),
            trusted=True).run(env, graph.weight_values)
    values = {o: env[o] for o in split.server_outputs}
    got = RequestPath._outputs(None, _answer(run, values), run)
    assert got.keys() == values.keys()
    for o in values:
        assert torch.equal(got[o], values[o]) and got[o].dtype == values[o].dtype
    missing = next(iter(values))
    with pytest.raises(ProtocolError, match="did not return"):
        RequestPath._outputs(None, _answer(run, {k: v for k, v in values.items() if k != missing}), run)
    bad = {**values, missing: values[missing].reshape(-1)}  # the right bytes in another shape
    with pytest.raises(ProtocolError, match="expected"):
        RequestPath._outputs(None, _answer(run, bad), run)
    bad = {**values, missing: values[missing].double()}  # another dtype
    with pytest.raises(ProtocolError, match="expected"):
        RequestPath._outputs(None, _answer(run, bad), run)
