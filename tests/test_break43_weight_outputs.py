"""break43 F1: an output that is a weight, or a view of one, is eager's on every path.

(a) Under the caller's ``torch.inference_mode`` an output that is a view of a weight (``self.fc.bias.T``,
``self.fc.weight[0]``, ``self.center.view(1, 5)``) came back an inference tensor on every path, local included
(``as_callers`` took it for a computed output); eager's is a normal tensor (a view of a normal tensor stays normal),
so ``(out * p).sum().backward()`` afterwards raised where eager's worked. On a split or the server it was a copy made
from the server's bytes, where eager's is a view of the module's live weight.
(b) Returned beside a view of it (``return y, self.fc.weight, self.fc.weight[0]``), the weight itself came back a
plain ``Tensor`` copy from a split or the server (``OutputLayout`` rebuilt the storage group from the server's bytes);
eager answers the ``Parameter`` object.

Now ``OutputLayout.weights`` (``modelgraph.out_layout.WeightView``) makes each such output eager's view op on the
module's own tensor, in the caller's mode, and leaves the weight itself out of any group. Each test compares with the
user's eager module itself over a local client, splits at three cuts, every op on the server (a real server on port
0) and a fallen-back client; cold and warm; under grad, ``no_grad`` and ``inference_mode``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from tests.every_path import CONTEXTS, clients, fallen_back, remote, works
from ue_client import CoinferClient
from ue_client.verify import within_tolerance


class _ParamViews(nn.Module):
    """The finding's repro: views of a parameter and a buffer, and the parameter itself beside its view."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.register_buffer("center", torch.randn(5))

    def forward(self, x):
        return self.fc(x), self.fc.weight, self.fc.bias.T, self.fc.weight[0], self.center.view(1, 5)


class _Mixed(nn.Module):
    """A transposed parameter (the graph runs a contiguous copy of it), a buffer returned beside its views, and an
    output computed from a weight (not a view: its own memory, as eager's)."""

    def __init__(self) -> None:
        super().__init__()
        self.wt = nn.Parameter(torch.randn(5, 6).t())  # (6, 5), strides (1, 6)
        self.register_buffer("anchors", torch.randn(4, 2))

    def forward(self, x):
        y = x @ self.wt
        return {"y": y, "col": self.wt[:, 1], "anchors": self.anchors, "a_t": self.anchors.t(),
                "a_row": self.anchors[2], "scaled": self.anchors * 2}


class _Attention(nn.Module):
    """Eager's output strides differ from the graph's (MHA's fused path under ``no_grad``), so the capture records
    eager's layout twice more with grad, from outputs it detaches: the weight returned as is must stay the module's."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        return self.mha(h, h, h, need_weights=False)[0], self.norm.weight, self.norm.weight[:3]


MODELS = {"param_views": (_ParamViews, (3, 6)), "mixed": (_Mixed, (3, 6)), "attention": (_Attention, (2, 5, 8))}

def _own(module) -> dict[int, torch.Tensor]:
    """The module's own tensors by storage."""
    return {t.untyped_storage().data_ptr(): t for t in [*module.parameters(), *module.buffers()]}


def _as_eager(got, want, module, what) -> None:
    """The same structure; per leaf the same type, kind, layout and values; a leaf that is one of the module's
    tensors in eager is that very object; one that views a module tensor in eager views it at the same place (the
    live weight's memory), with eager's ``requires_grad``; and using each in autograd outside any mode works, or
    raises, as eager's."""
    gl, gs = pytree.tree_flatten(got)
    wl, ws = pytree.tree_flatten(want)
    assert gs == ws, what
    own = _own(module)
    for i, (g, w) in enumerate(zip(gl, wl)):
        assert (type(g), g.is_inference(), g.dtype, g.shape, g.stride()) == (
            type(w), w.is_inference(), w.dtype, w.shape, w.stride()), (
            what, i, type(g), type(w), g.is_inference(), w.is_inference(), g.stride(), w.stride())
        assert within_tolerance(g, w), (what, i)
        base = own.get(w.untyped_storage().data_ptr())
        if any(w is t for t in own.values()):
            assert g is w, (what, i, "the module's own tensor")
        elif base is not None:
            assert (g.untyped_storage().data_ptr(), g.storage_offset()) == (
                w.untyped_storage().data_ptr(), w.storage_offset()), (what, i, "a view of the live weight")
            assert g.requires_grad == w.requires_grad, (what, i)
        else:
            assert g.untyped_storage().data_ptr() not in own, (what, i, "its own memory")
    p = torch.ones((), requires_grad=True)
    for i, (g, w) in enumerate(zip(gl, wl)):
        if w.is_floating_point():
            assert works(lambda t=g: (t * p).sum().backward()) == works(lambda t=w: (t * p).sum().backward()), (
                what, i, "autograd")
    module.zero_grad(set_to_none=True)


def _check(c, module, shape, expect, path) -> None:
    for k in range(2):  # cold and warm, on a fresh input each time
        for name, mode in CONTEXTS.items():
            x = torch.randn(shape, generator=torch.Generator().manual_seed(10 * k + len(name)))
            with mode():
                got = c(x)
                want = module(x)
            if expect == "split":
                assert c.last_report.server_ops > 0 and not c.last_report.fallback, (path, c.last_report)
            elif expect == "fallback":
                assert c.last_report.fallback, (path, c.last_report)
            _as_eager(got, want, module, (path, k, name))


@pytest.mark.parametrize("model", list(MODELS))
def test_weights_and_views_of_weights_are_eagers_on_every_path(server, model) -> None:
    cls, shape = MODELS[model]
    torch.manual_seed(43)
    module = cls().eval()
    x = torch.randn(shape)
    for path, c, expect in clients(server, module, x):
        with c:
            _check(c, module, shape, expect, path)
    with fallen_back(module, x) as c:
        _check(c, module, shape, "fallback", "fallback")


def test_a_write_into_a_buffers_view_reaches_the_buffer_as_in_eager(server) -> None:
    """Eager's ``self.center.view(1, 5)`` is the buffer's memory: a write into it changes the buffer (which the
    client then refuses to answer from the weights it sent, as any change in place). From a split it was a copy."""
    torch.manual_seed(43)
    x = torch.randn(3, 6)
    for path in ("local", "split at 1", "all-server"):
        module = _ParamViews().eval()
        before = module.center.clone()
        c = CoinferClient(module, (x,)) if path == "local" else remote(
            server, module, x, 1 if path == "split at 1" else None, fallback=False)
        with c:
            with torch.no_grad():
                y = c(x)
            y[4].mul_(2)
            assert torch.equal(module.center, before * 2), path
