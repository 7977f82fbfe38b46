"""A cut tensor whose layout has stride-0 dimensions (an ``expand``) travels as its compact base.

An HF-style attention mask is built as ``mask[:, None, None, :].expand(B, H, T, T)``: stride 0 in dims 1 and 2, T
floats of values for B x H x T x T logical elements. The server only ever reads index 0 along such dims
(``modelgraph.tensors.restore_layout``), so a split after the expand sent T x T x H floats per row of the batch for
nothing (a 2-layer BERT-width model: 48 MiB per request for 8 KiB of mask). Now the UE sends the compact base
(``modelgraph.tensors.compact_for_wire``: when the run-time tensor has stride 0 there too), the server takes either
form (``edge_server.requests``, ``SliceProgram.prepare_input``) and the planner prices the cut at the compact size
(``ModelGraph.used_out_bytes``).

A real edge server on a free loopback port: ``CoinferClient`` with fixed splits (cold and warm, answers equal to the
captured graph bit for bit and to the eager model within tolerance, bytes sent = the compact size), and a raw client
written against the proto (the dense form, still what a third-party client sends, and the compact one, as chunks and
inline; a shape that is neither is refused with INVALID_ARGUMENT and the next request on the stream is answered).
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from torch import nn

import modelgraph as mg
from modelgraph.errors import ShapeError
from modelgraph.tensors import TensorMeta, compact_for_wire, from_wire, restore_layout
from profiler.costs import cost_graph
from tests.test_inline_tensors import begin_msg, chunk_of, kinds_of
from tests.test_server import assert_clean, assert_healthy, open_msg, request_msgs, run_session, weight_msgs
from ue_client import CoinferClient, new_tenant
from ue_client.verify import max_abs_diff, within_tolerance

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
B, T, D, H = 2, 16, 32, 4


class MaskAttention(nn.Module):
    """One attention block with an HF-style expanded additive mask, and an expanded non-mask tensor (the sequence's
    mean, ``expand``ed over the sequence and concatenated to the attention's output)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        m = ((1.0 - mask) * -10000.0)[:, None, None, :].expand(b, H, t, t)
        h = x.relu()
        ctx = h.mean(dim=1, keepdim=True).expand(b, t, D)
        q = self.q(h).view(b, t, H, D // H).transpose(1, 2)
        k = self.k(h).view(b, t, H, D // H).transpose(1, 2)
        v = self.v(h).view(b, t, H, D // H).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // H) + m
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)
        return self.o(torch.cat([a, ctx], -1))


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[0, 10 + seed % 5:] = 0
    return torch.randn(B, T, D, generator=g), mask


@pytest.fixture(scope="module")
def net():
    module = MaskAttention().eval()
    x = _inputs(1)
    return module, x, mg.capture(module, x, name="mask_attention")


def _pos(graph: mg.ModelGraph, name: str) -> int:
    return next(i for i, op in enumerate(graph.ops) if op.name == name)


def _expands(graph: mg.ModelGraph) -> list[str]:
    return [op.name for op in graph.ops if op.target == "aten.expand.default"]


# ---- the helpers ---------------------------------------------------------------------------------------------
def test_wire_shape_and_bytes() -> None:
    mask = TensorMeta((4, 12, 512, 512), "float32", (512, 0, 0, 1))  # the BERT-width mask of the finding
    assert mask.wire_shape == (4, 1, 1, 512)
    assert (mask.nbytes, mask.wire_nbytes) == (48 * 2**20, 8192)
    assert TensorMeta((4, 1, 512), "float32", (512, 0, 1)).wire_shape == (4, 1, 512)  # size 1: nothing to drop
    for meta in (TensorMeta((3, 4), "float32"), TensorMeta((4, 3), "float32", (1, 4)),
                 TensorMeta((0, 5), "float32", (5, 0))):
        assert meta.wire_shape == meta.shape and meta.wire_nbytes == meta.nbytes


def test_compact_for_wire_only_when_the_run_time_tensor_has_stride_0_there() -> None:
    meta = TensorMeta((2, 3, 5, 5), "float32", (5, 0, 0, 1))
    base = torch.randn(2, 5)
    wide = base[:, None, None, :].expand(2, 3, 5, 5)
    got = compact_for_wire(wide, meta)
    assert tuple(got.shape) == (2, 1, 1, 5) and torch.equal(got.reshape(2, 5), base)
    dense = wide.contiguous()  # the same values, but its layout says nothing about them: sent dense
    assert compact_for_wire(dense, meta) is dense
    half = torch.randn(2, 1, 5, 5).expand(2, 3, 5, 5)  # stride 0 in dim 1 only: dim 2's values differ
    assert compact_for_wire(half, meta) is half


def test_prepare_input_takes_both_forms_and_gives_the_same_tensor() -> None:
    """The compact base, expanded back, is the dense form's restored tensor: same values, same strides; any other
    shape is refused."""
    meta = TensorMeta((2, 3, 5, 5), "float32", (5, 0, 0, 1))
    wide = torch.randn(2, 5)[:, None, None, :].expand(2, 3, 5, 5)
    from_dense = restore_layout(wide.contiguous(), meta)
    from_compact = restore_layout(from_wire(compact_for_wire(wide, meta).contiguous(), meta), meta)
    assert torch.equal(from_dense, from_compact) and from_dense.stride() == from_compact.stride() == meta.stride
    with pytest.raises(ShapeError):
        from_wire(torch.zeros(2, 3, 1, 5), meta)


def test_the_planner_prices_the_cut_compact_and_a_returned_output_dense(net) -> None:
    _, _, graph = net
    costs = {op.name: op.out_bytes for op in cost_graph(graph).ops}
    for name in _expands(graph):
        op = graph.op_by_name[name]
        (ref,) = op.output_refs()
        meta = op.output_meta(ref)
        assert meta.wire_nbytes < meta.nbytes and costs[name] == meta.wire_nbytes, (name, meta)

    class Returns(nn.Module):  # the expanded tensor is a graph output: it comes back dense
        def forward(self, x):
            return x.relu()[:, None, :].expand(2, 3, 4)

    g2 = mg.capture(Returns().eval(), (torch.randn(2, 4),))
    (op,) = [o for o in g2.ops if o.target == "aten.expand.default"]
    assert g2.used_out_bytes(op) == 2 * 3 * 4 * 4


def test_head_costs_price_a_tensor_the_pinned_tail_reads_dense(net) -> None:
    """A whole-model cost graph (``ClientOptions.costs``) prices the mask compact: a server op reads it. With the
    op reading it pinned to the UE, the head returns it to the UE, dense: the head's cost graph prices it so."""
    from modelgraph.pinning import pin_off_allowlist
    from ue_client.calibration import head_costs

    _, _, graph = net
    mask_op = _expands(graph)[0]
    (ref,) = graph.op_by_name[mask_op].output_refs()
    meta = graph.meta_of(ref)
    head = pin_off_allowlist(graph, lambda target: target != "aten.add.Tensor").head
    assert ref in head.outputs
    full = cost_graph(graph)
    assert {o.name: o.out_bytes for o in full.ops}[mask_op] == meta.wire_nbytes
    assert {o.name: o.out_bytes for o in head_costs(full, head).ops}[mask_op] == meta.nbytes


# ---- through CoinferClient ----------------------------------------------------------------------------------
def _cut_bytes(graph: mg.ModelGraph, k: int) -> tuple[int, int]:
    """(compact, logical) bytes of the cut tensors of the split at ``k``."""
    cut = graph.split_at(k).cut_tensors
    return (sum(graph.meta_of(r).wire_nbytes for r in cut), sum(graph.meta_of(r).nbytes for r in cut))


@pytest.mark.parametrize("where", ["all", "after_mask", "after_both", "at_add", "after_add"])
def test_split_equals_the_model_and_sends_the_compact_mask(server, net, where) -> None:
    module, x0, graph = net
    mask_op, ctx_op = _expands(graph)
    add = next(op.name for op in graph.ops if op.target == "aten.add.Tensor")
    k = {"all": 0, "after_mask": _pos(graph, mask_op) + 1, "after_both": _pos(graph, ctx_op) + 1,
         "at_add": _pos(graph, add), "after_add": _pos(graph, add) + 1}[where]
    compact, logical = _cut_bytes(graph, k)
    if where in ("after_mask", "after_both", "at_add"):
        assert compact < logical  # the expanded mask (and the context) is a cut tensor there
    with CoinferClient(module, x0, server=server.address, link=FAST, tenant=new_tenant(), fallback=False,
                       server_ops=k) as c:
        for i, x in enumerate((x0, _inputs(2), _inputs(3))):  # cold, then warm with other values
            y = c(*x)
            rep = c.last_report
            assert not rep.fallback and rep.server_ops > 0, (where, i, rep.fallback_reason)
            assert max_abs_diff(y, c.reference(*x)) == 0.0, (where, i)
            with torch.inference_mode():
                assert within_tolerance(y, module(*x)), (where, i)
            assert rep.sent_tensor_bytes == compact, (where, i, rep.sent_tensor_bytes, compact, logical)


class _Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).relu()


def _expanded_input(seed: int) -> torch.Tensor:
    return torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(seed)).expand(2, 50, 8)


def test_an_input_captured_expanded_goes_inline_compact(server) -> None:
    """A graph input captured with stride 0 (the caller passed an ``expand``) and passed so again: every op on the
    server, the input inside BeginRequest as its compact base (2 x 8 floats, not 2 x 50 x 8)."""
    module = _Dense().eval()
    with CoinferClient(module, (_expanded_input(1),), server=server.address, link=FAST, tenant=new_tenant(),
                       fallback=False, server_ops=0) as c:
        assert c.graph.inputs["x"].wire_shape == (2, 1, 8)
        for seed in (1, 2):
            x = _expanded_input(seed)
            y = c(x)
            assert not c.last_report.fallback, c.last_report.fallback_reason
            assert max_abs_diff(y, c.reference(x)) == 0.0
            assert c.last_report.sent_tensor_bytes == 2 * 8 * 4


def test_an_input_captured_expanded_and_passed_dense_equals_the_model(server) -> None:
    """A graph input captured as an ``expand`` and called dense, with other values along that dimension: the server
    read index 0 of it only (the declared stride 0) and answered wrong, silently, before session 31's fix in
    ``restore_layout`` (values win over the layout)."""
    module = _Dense().eval()
    with CoinferClient(module, (_expanded_input(1),), server=server.address, link=FAST, tenant=new_tenant(),
                       fallback=False, server_ops=0) as c:
        x = torch.randn(2, 50, 8)
        y = c(x)
        assert not c.last_report.fallback, c.last_report.fallback_reason
        assert max_abs_diff(y, c.reference(x)) == 0.0
        torch.testing.assert_close(y, module(x))


class _ViewOfInput(nn.Module):
    """A view of the input (its stride 0 carried through the permute at capture) cut to the server."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(50, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.permute(0, 2, 1)).relu()


def test_a_view_of_an_input_captured_expanded_and_passed_dense_equals_the_model(server) -> None:
    """The permute of a graph input captured expanded is a cut tensor declared with stride 0; called dense, the
    UE sends it dense and the server keeps its values (``restore_layout``), at every split."""
    module = _ViewOfInput().eval()
    for k in (0, 1):
        with CoinferClient(module, (_expanded_input(1),), server=server.address, link=FAST, tenant=new_tenant(),
                           fallback=False, server_ops=k) as c:
            for seed in (3, 4):
                x = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(seed))
                y = c(x)
                assert not c.last_report.fallback, c.last_report.fallback_reason
                torch.testing.assert_close(y, module(x))
            x = _expanded_input(5)  # and an expanded one again: compact, right
            torch.testing.assert_close(c(x), module(x))


# ---- a raw client ----------------------------------------------------------------------------------------------
def _raw_case(graph: mg.ModelGraph, x: tuple):
    """The split right after both expands, its spec, the UE part's cut tensors and the expected output."""
    k = _pos(graph, _expands(graph)[1]) + 1
    split = graph.split_at(k)
    spec = mg.make_slice(graph, split)
    env = mg.run_ue_part(graph, split, x)
    cut = {r: env[r] for r in split.cut_tensors}
    return spec, cut, mg.run_graph(graph, x)


def test_a_raw_client_sending_dense_or_compact_gets_the_answer(server, channel, stub, net) -> None:
    """A third-party client that sends the expanded tensors dense (as every client did) and one that sends them
    compact, as TensorChunks and inline in BeginRequest: the same answer, bit for bit."""
    _, x, graph = net
    spec, cut, ref = _raw_case(graph, x)
    wide = [r for r in cut if spec.inputs[r].wire_shape != spec.inputs[r].shape]
    assert len(wide) == 2
    small = {r: (compact_for_wire(t, spec.inputs[r]).contiguous() if r in wide else t) for r, t in cut.items()}
    assert [tuple(small[r].shape) for r in wide] == [spec.inputs[r].wire_shape for r in wide]
    (name,) = spec.outputs
    c = run_session(stub, [open_msg("compact-raw", spec), *weight_msgs(graph, spec), *request_msgs(1, cut),
                           *request_msgs(2, small)])
    assert not c.failed, c.failed
    for rid in (1, 2):
        torch.testing.assert_close(c.outputs[rid][name], ref, rtol=0, atol=0)
    c2, _ = kinds_of(stub, [open_msg("compact-raw", spec), begin_msg(3, [chunk_of(r, t) for r, t in cut.items()]),
                            begin_msg(4, [chunk_of(r, t) for r, t in small.items()])])
    assert not c2.failed, c2.failed
    for rid in (3, 4):
        torch.testing.assert_close(c2.outputs[rid][name], ref, rtol=0, atol=0)
    assert_clean(server)
    assert_healthy(channel)


def test_a_shape_that_is_neither_form_is_refused(server, channel, stub, net) -> None:
    """Half compact (stride-0 dim 2 dropped, dim 1 kept) is neither the logical nor the compact shape:
    INVALID_ARGUMENT naming both, as a TensorChunk and inline; the next request on the stream is answered."""
    _, x, graph = net
    spec, cut, ref = _raw_case(graph, x)
    mask = next(r for r in cut if cut[r].dim() == 4)
    bad = dict(cut)
    bad[mask] = cut[mask][:, :, :1, :].contiguous()
    (name,) = spec.outputs
    for how in ("chunks", "inline"):
        if how == "chunks":
            msgs = [*request_msgs(1, bad), *request_msgs(2, cut)]
        else:
            msgs = [begin_msg(1, [chunk_of(r, t) for r, t in bad.items()]),
                    begin_msg(2, [chunk_of(r, t) for r, t in cut.items()])]
        c, _ = kinds_of(stub, [open_msg(f"neither-{how}", spec), *weight_msgs(graph, spec), *msgs])
        assert list(c.failed) == [1], (how, c.failed)
        msg = c.failed[1].message
        assert c.failed[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (how, c.failed[1])
        assert "expects" in msg and str(list(spec.inputs[mask].wire_shape)) in msg, (how, msg)
        torch.testing.assert_close(c.outputs[2][name], ref, rtol=0, atol=0)
    assert_clean(server)
    assert_healthy(channel)


def test_a_compact_cut_tensor_passed_through_as_an_output_comes_back_whole(server, channel, stub, net) -> None:
    """Hand-made slices that return a cut tensor unchanged (read by an op, and read by none: the server's
    pass-through path): sent compact, it is answered in its logical shape with the expanded values, as when it is
    sent dense."""
    import json

    _, x, graph = net
    spec, cut, ref = _raw_case(graph, x)
    mask = next(r for r in cut if cut[r].dim() == 4)
    raw = json.loads(spec.to_json())
    raw["outputs"] = [*raw["outputs"], mask]
    read = mg.SliceSpec.from_json(json.dumps(raw))
    alone = mg.SliceSpec.from_json(json.dumps({"version": 1, "ops": [], "inputs": {mask: raw["inputs"][mask]},
                                               "outputs": [mask], "weights": {}}))
    small = {r: compact_for_wire(t, spec.inputs[r]).contiguous() for r, t in cut.items()}
    c = run_session(stub, [open_msg("compact-through", read), *weight_msgs(graph, read), *request_msgs(1, small),
                           *request_msgs(2, cut)])
    assert not c.failed, c.failed
    for rid in (1, 2):
        torch.testing.assert_close(c.outputs[rid][spec.outputs[0]], ref, rtol=0, atol=0)
        assert torch.equal(c.outputs[rid][mask], cut[mask])
    c = run_session(stub, [open_msg("compact-alone", alone), *request_msgs(1, {mask: small[mask]}),
                           *request_msgs(2, {mask: cut[mask]})])
    assert not c.failed and not c.rejected, (c.failed, c.rejected)
    for rid in (1, 2):
        assert torch.equal(c.outputs[rid][mask], cut[mask])
    assert_clean(server)
    assert_healthy(channel)


class _ReturnsAView(nn.Module):
    """Returns a view of its input: captured expanded, the output's layout has stride 0 too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1)


def test_an_output_declared_stride_0_comes_back_with_its_values(server) -> None:
    """The UE side of ``restore_layout``: the server's output (a permute of an input captured expanded, called
    dense) has values along the dimension its captured layout had at stride 0; restoring it must keep them."""
    module = _ReturnsAView().eval()
    with CoinferClient(module, (_expanded_input(1),), server=server.address, link=FAST, tenant=new_tenant(),
                       fallback=False, server_ops=0) as c:
        x = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(6))
        y = c(x)
        assert not c.last_report.fallback, c.last_report.fallback_reason
        assert c.last_report.server_ops, "the view ran on the server"
        torch.testing.assert_close(y, module(x), rtol=0, atol=0)


class _Reciprocal(nn.Module):
    """``1 / x``: the sign of a zero shows in the answer (-inf / +inf, clamped)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 / (x * self.w)).clamp(-5, 5)


def test_a_signed_zero_along_a_declared_stride_0_dimension_is_kept(server) -> None:
    """break37 F2: ``restore_layout`` compared with ``torch.equal``, for which -0.0 is 0.0: an input captured
    expanded and called dense with 0.0 at index 0 and -0.0 after was restored as index 0 expanded, and the server
    answered 5 where ``model(x)`` answers -5. Now compared bit for bit."""
    module = _Reciprocal().eval()
    example = (torch.ones(2, 1, 4).expand(2, 3, 4),)
    with CoinferClient(module, example, server=server.address, link=FAST, tenant=new_tenant(), fallback=False,
                       server_ops=0) as c:
        x = torch.zeros(2, 3, 4)
        x[:, 1:] = -0.0
        y = c(x)
        assert not c.last_report.fallback, c.last_report.fallback_reason
        torch.testing.assert_close(y, module(x), rtol=0, atol=0)
        assert bool((y[:, 1:] == -5).all())


def test_restore_layout_keeps_an_expanded_nan_expanded() -> None:
    """break37 F3: an expanded NaN came back dense (``torch.equal``: NaN is not NaN); its values were right, its
    strides not eager's."""
    meta = TensorMeta((3, 4), "float32", (0, 1))
    out = restore_layout(torch.full((3, 4), float("nan")), meta)
    assert out.stride() == (0, 1) and bool(out.isnan().all())
    signed = torch.zeros(3, 4)
    signed[1:] = -0.0
    assert restore_layout(signed, meta).stride() == (4, 1)  # -0.0 differs from 0.0: kept as received
