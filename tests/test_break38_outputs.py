"""break38 F3, F4: outputs laid out and aliased as the user's eager ``model(*inputs)``'s, on every path.

F4: ``nn.MultiheadAttention(batch_first=True)`` under ``no_grad`` takes eager's fused path, whose ``(2, 5, 8)`` output
is contiguous, while the captured math path answers strides ``(8, 16, 1)``: ``y.view(2, 40)`` raised where eager's
worked. F3: outputs that are views of one tensor (``h.t()``, ``h[:, ::2]``, ``h.expand(...)``) or of an input came
back from the server as separate tensors (local runs kept the sharing): writing into one no longer showed in the
others. Now the capture's check records eager's output layout (``modelgraph.out_layout``) and every path (local,
split, offloaded, fallen back; cold and warm) gives it back. Each test compares with the eager module itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelgraph.out_layout import Member, OutputLayout
from tests.checks import FAST_LINK
from ue_client import CoinferClient, new_tenant
from ue_client.verify import within_tolerance


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.mha(h, h, h, need_weights=False)[0]  # self-attention: eager's fused path under no_grad


class _Views(nn.Module):
    """Outputs that are views of one tensor, and one that is a view of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor):
        h = self.fc(x).relu()
        return {"h": h, "t": h.t(), "every_other": h[:, ::2], "wide": h.expand(2, 4, 8), "x_t": x.t(),
                "own": h + 1, "again": h, "x": x}


def _clients(server, module, x):
    """(path, client): local, split in the middle, every op offloaded."""
    yield "local", CoinferClient(module, (x,))
    n = len(CoinferClient(module, (x,)).graph.ops)
    for path, ops in (("split", n // 2), ("offload", None)):
        yield path, CoinferClient(module, (x,), server=server.address, policy="offload", server_ops=ops,
                                  link=FAST_LINK, tenant=new_tenant(), profile_runs=2, fallback=False, probe=False)


def _eager(module, x):
    with torch.no_grad():
        return module(x)


def _stopped_server_client(module, x):
    """A client whose split ran warm, then its server stopped: its next calls fall back here."""
    from edge_server.testing import ServerThread

    srv = ServerThread(threads=1).start()
    try:
        c = CoinferClient(module, (x,), server=srv.address, policy="offload", link=FAST_LINK, tenant=new_tenant(),
                          profile_runs=2, probe=False, timeout_ms=20_000)
        c(x)
        assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
    finally:
        srv.stop()
    return c


def _attention_as_eager(y: torch.Tensor, e: torch.Tensor, what) -> None:
    assert (y.dtype, y.shape, y.stride(), y.is_contiguous()) == (e.dtype, e.shape, e.stride(), e.is_contiguous()), (
        what, y.stride(), e.stride())
    assert torch.equal(y.view(2, 40), y.reshape(2, 40))  # raised "view size is not compatible" before
    assert within_tolerance(y, e), what


def test_attention_under_no_grad_answers_eagers_contiguous_layout_on_every_path(server) -> None:
    torch.manual_seed(38)
    module = _Attention().eval()
    x = torch.randn(2, 5, 8)
    assert _eager(module, x).is_contiguous()  # eager's fused path (the captured math path answers (8, 16, 1))
    for path, c in _clients(server, module, x):
        with c:
            for k in range(2):  # cold and warm, on a fresh input
                x2 = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(k))
                with torch.no_grad():
                    _attention_as_eager(c(x2), _eager(module, x2), (path, k))
                # with grad eager takes the math path, strides (8, 16, 1), as the graph: given back as such
                y, e = c(x2), module(x2).detach()
                assert (y.shape, y.stride()) == (e.shape, e.stride()) == ((2, 5, 8), (8, 16, 1)), (path, k)
                assert within_tolerance(y, e), (path, k)
            if c.server is not None:
                assert all(r.server_ops > 0 and not r.fallback for r in c.reports), c.reports
            with torch.no_grad():
                _attention_as_eager(c.reference(x), _eager(module, x), (path, "reference"))
    c = _stopped_server_client(module, x)
    with c:
        with torch.no_grad():
            y = c(x)
        assert c.last_report.fallback, c.last_report
        _attention_as_eager(y, _eager(module, x), "fallback")


def _sharing(out: dict, x: torch.Tensor) -> dict:
    """Which outputs share storage with which (and the input), at which relative byte offset, with what strides."""
    named = {**out, "input": x}

    def at(t):
        return t.untyped_storage().data_ptr(), t.storage_offset() * t.element_size()

    return {(a, b): at(named[a])[1] - at(named[b])[1]
            for a in named for b in named if a < b and at(named[a])[0] == at(named[b])[0]}


def _views_as_eager(y: dict, x: torch.Tensor, module, what) -> None:
    ex = x.clone()
    e = _eager(module, ex)
    assert list(y) == list(e), what
    for k in e:
        assert (y[k].dtype, y[k].shape, y[k].stride()) == (e[k].dtype, e[k].shape, e[k].stride()), (what, k)
        assert within_tolerance(y[k], e[k]), (what, k)
    assert _sharing(y, x) == _sharing(e, ex), (what, _sharing(y, x), _sharing(e, ex))
    assert (y["again"] is y["h"]) == (e["again"] is e["h"]), what
    assert e["x"] is ex and y["x"].data_ptr() == x.data_ptr(), what  # the input itself: its storage (not `is`)
    # what a user sees: a write into one shows in its views (and in the input) as in eager, nowhere else (outside
    # inference_mode: every path's outputs are normal tensors as eager's, break41 F4)
    for out in (y, e):
        out["h"][1, 2] = 100.0
        out["x_t"][3, 0] = -7.0
    for k in e:
        assert torch.equal(y[k], e[k]) or within_tolerance(y[k], e[k]), (what, k)
        assert (y[k] == 100.0).sum() == (e[k] == 100.0).sum(), (what, k)
    assert x[0, 3] == -7.0 and ex[0, 3] == -7.0, what


def test_outputs_that_are_views_share_storage_as_in_eager_on_every_path(server) -> None:
    torch.manual_seed(38)
    module = _Views().eval()
    x = torch.randn(4, 8)
    for path, c in _clients(server, module, x):
        with c:
            for k in range(2):  # cold and warm, on a fresh input (the view of the input is of the call's input)
                x2 = torch.randn(4, 8, generator=torch.Generator().manual_seed(k))
                with torch.no_grad():
                    y = c(x2)
                _views_as_eager(y, x2, module, (path, k))
            if c.server is not None:
                assert all(r.server_ops > 0 and not r.fallback for r in c.reports), c.reports
    c = _stopped_server_client(module, x)
    with c:
        x2 = x.clone()
        y = c(x2)
        assert c.last_report.fallback, c.last_report
        _views_as_eager(y, x2, module, "fallback")


def test_an_output_layout_is_given_back_from_separate_tensors() -> None:
    """The rule on its own: a gapped layout, an expand of a group's member, the same object twice, a view of an
    input; tensors already laid out so are kept (no copy)."""
    f32 = torch.float32
    base = Member(0, 0, (4, 8), (8, 1), f32)
    layout = OutputLayout(
        strides=(Member(3, 0, (2, 3), (6, 2), f32),),
        groups=((base, Member(1, 0, (2, 4, 8), (0, 8, 1), f32), Member(2, 0, (4, 8), (8, 1), f32, same=0)),),
    )
    h = torch.arange(32.0).reshape(4, 8)
    gapped = torch.arange(6.0).reshape(2, 3)
    y = layout.apply([h.clone(), h.expand(2, 4, 8).clone(), h.clone(), gapped], {})
    assert y[0] is y[2] and y[1].stride() == (0, 8, 1) and y[3].stride() == (6, 2)
    assert torch.equal(y[0], h) and torch.equal(y[1], h.expand(2, 4, 8)) and torch.equal(y[3], gapped)
    y[0][0, 0] = -1.0
    assert y[1][1, 0, 0] == -1.0
    kept = [h, h.expand(2, 4, 8), h, y[3]]
    assert all(a is b for a, b in zip(layout.apply(kept, {}), kept))


@pytest.mark.parametrize("grad", [False, True])
def test_a_model_whose_layout_agrees_records_nothing(grad) -> None:
    """Most models: no layout kept, nothing copied at run time."""
    torch.manual_seed(38)
    module = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = torch.randn(3, 8, requires_grad=grad)
    assert CoinferClient(module, (x,)).graph.out_layout is None
