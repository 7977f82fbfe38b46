"""An op off the server allowlist pins only itself and its descendants; the server still profiles the rest."""

from __future__ import annotations

import grpc
import torch
from torch import nn

from modelgraph import capture, decode_slice, encode_slice, make_slice
from modelgraph.allowlist import is_allowed
from modelgraph.execute import SliceProgram, collect_outputs, run_graph, run_ue_part
from modelgraph.pinning import pin_off_allowlist, run_tail
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from ue_client import wire

OFF = "aten.cumprod.default"  # a harmless op that is not on the allowlist


class MidPinned(nn.Module):
    """conv/relu/linear, then an off-allowlist op feeding one head; a second head does not depend on it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1)))
        return {"a": self.a(torch.cumprod(h, dim=1)).softmax(-1), "b": self.b(h)}


def _model():
    torch.manual_seed(0)
    m = MidPinned().eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    return m, x, capture(m, (x,), name="mid_pinned")


def _descendants(g, name: str) -> set[str]:
    out, todo = set(), [name]
    while todo:
        op = g.op_by_name[todo.pop()]
        for r in op.output_refs():
            for c in g.consumers.get(r, ()):
                if c not in out:
                    out.add(c)
                    todo.append(c)
    return out


def test_off_allowlist_op_pins_only_itself_and_its_descendants():
    _, x, g = _model()
    pinned_op = next(op.name for op in g.ops if op.target == OFF)
    pt = pin_off_allowlist(g)
    expected_tail = {pinned_op} | _descendants(g, pinned_op)
    assert set(pt.tail) == expected_tail
    assert dict(pt.pins) == {pinned_op: len(expected_tail)}
    assert pt.to_json()["pinned"] == [{"op": pinned_op, "target": OFF, "kept_on_ue": len(expected_tail)}]
    assert "kept" in pt.note() and pinned_op in pt.note()
    assert len(pt.head.ops) == len(g.ops) - len(expected_tail) > len(g.ops) // 2
    assert all(is_allowed(op.target) for op in pt.head.ops)
    whole = run_graph(g, (x,))
    env0 = g.bind((x,))
    for k in range(len(pt.head.ops) + 1):  # every cut of the head, the tail on the UE after it
        sp = pt.head.split_at(k)
        env = run_ue_part(pt.head, sp, dict(env0))
        if sp.server_order:
            spec, weights = decode_slice(encode_slice(make_slice(pt.head, sp), pt.head.weight_values))
            env.update(SliceProgram(spec).run({r: env[r].contiguous() for r in sp.cut_tensors}, weights))
        out = collect_outputs(g, run_tail(g, pt, env))
        assert out.keys() == whole.keys()
        for key in whole:
            torch.testing.assert_close(out[key], whole[key], rtol=0, atol=0)


def test_nothing_pinned_keeps_the_graph():
    torch.manual_seed(0)
    g = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), (torch.randn(1, 4),))
    pt = pin_off_allowlist(g)
    assert pt.head is g and not pt.tail and not pt.pins and pt.note() == ""


def test_server_profiles_every_op_but_the_unknown_one(server):
    _, _, g = _model()
    spec = make_slice(g, g.split(op.name for op in g.ops), with_hashes=False)
    unknown = {op.name for op in g.ops if not is_allowed(op.target)}
    assert len(unknown) == 1
    with grpc.insecure_channel(server.address) as ch:
        prof = wire.profile_graph(pb_grpc.EdgeServiceStub(ch), spec.to_json(), timeout_s=120.0, iterations=3, warmup=1)
    assert set(prof.ops) == {op.name for op in g.ops} - unknown
    assert all(mean > 0 for mean, _ in prof.ops.values())
