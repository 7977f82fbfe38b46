"""The ops users' models commonly hit are on the server allowlist: each captured, split vs whole
bitwise, and accepted by the server's slice compiler (meta-shape validation) at every cut."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_server.slices import compile_slice
from modelgraph import capture, decode_slice, encode_slice, make_slice
from modelgraph.allowlist import is_allowed
from modelgraph.execute import SliceProgram, collect_outputs, run_graph, run_ue_part


class TopK(nn.Module):
    """A classifier returning its top-5 (the model of issue 10, fault 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return torch.topk(self.fc(x).softmax(-1), 5)


class Sorts(nn.Module):
    def forward(self, x):
        x = x * 3
        v, i = torch.sort(x, dim=1, descending=True)
        return v, i, torch.argsort(x, dim=1), torch.sort(x, stable=True)[0], torch.argsort(x, dim=1, stable=True)


class SliceWrite(nn.Module):
    """Slice writes on an intermediate: functionalised into slice_scatter/select_scatter/index_put/copy/fill."""

    def forward(self, x):
        y = x * 2
        y[:, 0] = 0
        y[:, 2:4] = x[:, :2]
        y[torch.tensor([1]), 1] = 5.0
        y[y > 3] = 0.0
        return y + 1


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True, num_layers=2)
        self.gru = nn.GRU(16, 4, batch_first=True)

    def forward(self, x):
        y, (h, _) = self.lstm(x)
        z, _ = self.gru(y)
        return z, h


class Upsample(nn.Module):
    def forward(self, x):
        x = x + 1
        return (
            F.interpolate(x, scale_factor=2, mode="bicubic"),
            F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=True),
            F.pixel_shuffle(x, 2),
        )


class GridSample(nn.Module):
    def forward(self, x, grid):
        x = x * 2
        return (
            F.grid_sample(x, grid, align_corners=False),
            F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=True),
        )


class Bags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.EmbeddingBag(20, 4, mode="mean")
        self.sum = nn.EmbeddingBag(20, 4, mode="sum")

    def forward(self, ids, offsets):
        return self.mean(ids, offsets) * 2, self.sum(ids.view(2, 3))


class NewZerosTrilWeightNorm(nn.Module):
    """Session 17: ops users' models hit that pinned everything after them to the UE (``new_zeros`` for an RNN's
    initial state, ``zero_`` on a view, ``tril``/``triu`` masks, ``parametrizations.weight_norm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.utils.parametrizations.weight_norm(nn.Linear(6, 6))

    def forward(self, x):
        h = self.proj(x)
        h[:, :2].zero_()
        z = h.new_zeros(h.shape[0], 2) + h.new_ones(h.shape[0], 2) + h.new_full((h.shape[0], 2), 0.5)
        sq = h[:, :, None] * h[:, None, :]
        return sq.tril() - sq.triu(1), torch.cat([h, z], 1)


def _cases():
    g = torch.Generator().manual_seed(3)
    return {
        "topk": (TopK, (torch.randn(2, 8, generator=g),), "aten.topk.default"),
        "sort_argsort": (Sorts, (torch.randn(2, 8, generator=g),), "aten.argsort.stable"),
        "slice_write": (SliceWrite, (torch.randn(3, 6, generator=g),), "aten.index_put.default"),
        "lstm_gru": (Recurrent, (torch.randn(2, 5, 8, generator=g),), "aten.lstm.input"),
        "bicubic_pixel_shuffle": (Upsample, (torch.randn(1, 4, 6, 6, generator=g),), "aten.upsample_bicubic2d.vec"),
        "grid_sample": (
            GridSample,
            (torch.randn(1, 2, 5, 5, generator=g), torch.rand(1, 3, 3, 2, generator=g) * 2 - 1),
            "aten.grid_sampler.default",
        ),
        "embedding_bag": (
            Bags,
            (torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 3])),
            "aten.embedding_bag.padding_idx",
        ),
        "new_zeros_tril_weight_norm": (NewZerosTrilWeightNorm, (torch.randn(3, 6, generator=g),),
                                       "aten._weight_norm.default"),
    }


CASES = _cases()


def _flat(x) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", list(CASES))
def test_common_ops_are_allowed_split_bitwise_and_compile_on_the_server(name):
    cls, ex, expect_op = CASES[name]
    torch.manual_seed(0)
    m = cls().eval()
    g = capture(m, ex, name=name)
    targets = {op.target for op in g.ops}
    assert expect_op in targets
    off = sorted(t for t in targets if not is_allowed(t))
    assert not off, f"{name}: ops off the allowlist: {off}"
    whole = run_graph(g, ex)
    with torch.no_grad():
        eager = m(*ex)
    for a, b in zip(_flat(whole), _flat(eager), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    env0 = g.bind(ex)
    n = len(g.ops)
    for k in sorted(set(range(0, n, max(1, n // 6))) | {n - 1}):  # cuts spread over the graph: server runs ops[k:]
        sp = g.split_at(k)
        spec = make_slice(g, sp)
        compiled = compile_slice(spec.to_json(), slice_id=f"{name}-{k}")  # the server's own checks
        assert compiled.program.order
        spec2, weights = decode_slice(encode_slice(spec, g.weight_values))
        env = run_ue_part(g, sp, dict(env0))
        env.update(SliceProgram(spec2).run({r: env[r].contiguous() for r in sp.cut_tensors}, weights))
        for a, b in zip(_flat(collect_outputs(g, env)), _flat(whole), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class _DtypeRoundTrip(nn.Module):
    """``x.to(dtype)`` leaves ``aten._assert_tensor_metadata`` nodes in the export (mvit_v2_s, raft)."""

    def forward(self, x):
        return (x.to(torch.float64) * 2).to(torch.float32) + 1


def test_static_metadata_asserts_are_dropped_at_capture():
    m, x = _DtypeRoundTrip(), torch.randn(2, 3)
    ep = torch.export.export(m, (x,)).run_decompositions({})
    assert any("_assert_tensor_metadata" in str(n.target) for n in ep.graph.nodes)
    g = capture(m, (x,))
    assert all("_assert" not in op.target for op in g.ops) and all(is_allowed(op.target) for op in g.ops)
    x2 = torch.randn(2, 3)
    assert torch.equal(run_graph(g, (x2,)), m(x2))
