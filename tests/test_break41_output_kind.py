"""break41 F4, F3: every path answers the kind of tensor, and the layout, the user's eager ``model(*inputs)`` answers.

F4: a graph runs under ``torch.inference_mode`` (``Program.run``), so a local or fallen-back call's outputs, and a
split's outputs computed on the UE (before the cut), were inference tensors: ``h.mul_(2)``, ``y += 1``,
``y.requires_grad_()`` or using one in autograd raised outside ``inference_mode`` where eager's took it (on a split,
depending on where the planner cut); under the caller's ``inference_mode`` a server's outputs were normal tensors
where eager's are inference tensors. Now ``modelgraph.out_layout.as_callers`` gives back the caller's kind.

F3: ``nn.MultiheadAttention`` frozen with ``requires_grad_(False)``, called with grad on an input that requires grad,
leaves its fused path in eager (strides (8, 16, 1)) but was answered the fused path's (40, 8, 1): the layout with
grad was chosen by ``torch.is_grad_enabled()`` alone. Now also by whether an input requires grad
(``OutputLayout.grad_inputs``).

Each test compares with the user's eager module itself, over a local client, splits at three cuts, every op on the
server (a real server on port 0) and a fallen-back client; cold and warm.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from tests.every_path import CONTEXTS, clients, fallen_back, works
from ue_client.verify import within_tolerance


class _TwoHeads(nn.Module):
    """break41 F4's repro: an output made before the cut beside one made after it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x).sigmoid()
        return h, self.b(h)


class _ConvNet(nn.Module):
    """A small classifier returning a dict, with an in-place ReLU and batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        f = self.relu(self.bn(self.conv(x))).mean((2, 3))
        logits = self.fc(f)
        return {"features": f, "logits": logits, "probs": logits.softmax(-1), "top": logits.argmax(-1)}


class _Views(nn.Module):
    """Outputs that are views of one another and of the input (``OutputLayout`` groups and input views)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x).relu()
        return {"h": h, "t": h.t(), "half": h[:, ::2], "x_row": x[0], "own": h * 2}


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        return self.mha(h, h, h, need_weights=False)[0]


MODELS = {
    "two_heads": (_TwoHeads, (5, 6)),
    "convnet": (_ConvNet, (2, 3, 8, 8)),
    "views": (_Views, (4, 8)),
    "attention": (_Attention, (2, 5, 8)),
}

def _as_eager(got, want, what) -> None:
    """The same structure; per leaf the same kind (inference or not), layout and values; then what a user does with
    the outputs outside any mode works, or raises, as on eager's: using one in autograd, an in-place write (which
    shows in the views of it as in eager's), ``requires_grad_()``."""
    gl, gs = pytree.tree_flatten(got)
    wl, ws = pytree.tree_flatten(want)
    assert gs == ws, what
    for i, (g, w) in enumerate(zip(gl, wl)):
        assert (g.is_inference(), g.dtype, g.shape, g.stride()) == (w.is_inference(), w.dtype, w.shape, w.stride()), (
            what, i, g.is_inference(), w.is_inference(), g.stride(), w.stride())
        assert within_tolerance(g, w), (what, i)
    p = torch.ones((), requires_grad=True)
    for i, (g, w) in enumerate(zip(gl, wl)):
        if w.is_floating_point():
            assert works(lambda t=g: (t.detach() * p).sum().backward()) == works(
                lambda t=w: (t.detach() * p).sum().backward()), (what, i, "autograd")
    for i, (g, w) in enumerate(zip(gl, wl)):
        assert works(lambda t=g: t.mul_(2)) == works(lambda t=w: t.mul_(2)), (what, i, "mul_")
    for i, (g, w) in enumerate(zip(gl, wl)):
        assert within_tolerance(g, w), (what, i, "after the writes")
    for i, (g, w) in enumerate(zip(gl, wl)):
        if w.is_floating_point():
            assert works(lambda t=g: t.requires_grad_()) == works(lambda t=w: t.requires_grad_()), (
                what, i, "requires_grad_")


def _check(c, module, shape, expect, path) -> None:
    for k in range(2):  # cold and warm, on a fresh input each time
        for name, mode in CONTEXTS.items():
            x = torch.randn(shape, generator=torch.Generator().manual_seed(10 * k + len(name)))
            xc, xe = x.clone(), x.clone()  # a write into an output viewing the input writes into that input
            with mode():
                got = c(xc)
                want = module(xe)
            if expect == "split":
                assert c.last_report.server_ops > 0 and not c.last_report.fallback, (path, c.last_report)
            elif expect == "fallback":
                assert c.last_report.fallback, (path, c.last_report)
            _as_eager(got, want, (path, k, name))
            assert within_tolerance(xc, xe), (path, k, name, "the input after the writes")


@pytest.mark.parametrize("model", list(MODELS))
def test_outputs_are_eagers_kind_of_tensor_on_every_path(server, model) -> None:
    cls, shape = MODELS[model]
    torch.manual_seed(41)
    module = cls().eval()
    x = torch.randn(shape)
    for path, c, expect in clients(server, module, x):
        with c:
            _check(c, module, shape, expect, path)
    with fallen_back(module, x) as c:
        _check(c, module, shape, "fallback", "fallback")


def _attention_strides_as_eager(server, frozen: bool) -> None:
    torch.manual_seed(41)
    module = _Attention().eval().requires_grad_(not frozen)
    x = torch.randn(2, 5, 8)
    paths = [(path, c) for path, c, _ in clients(server, module, x)]
    for path, c in [*paths, ("fallback", fallen_back(module, x))]:
        path = (path, "frozen" if frozen else "trainable")
        with c:
            for k in range(2):
                x2 = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(k))
                for rg, mode in ((True, contextlib.nullcontext), (False, contextlib.nullcontext),
                                 (True, torch.no_grad), (False, torch.no_grad)):
                    with mode():
                        got = c(x2.clone().requires_grad_(rg))
                        want = module(x2.clone().requires_grad_(rg)).detach()
                    assert (got.shape, got.stride()) == (want.shape, want.stride()), (
                        path, k, rg, mode, got.stride(), want.stride())
                    assert works(lambda t=got: t.view(10, 8)) == works(lambda t=want: t.view(10, 8)), (
                        path, k, rg, mode)
                    assert within_tolerance(got, want), (path, k, rg, mode)
            assert c.reference(x2.clone().requires_grad_(True)).stride() == module(
                x2.clone().requires_grad_(True)).stride(), path


def test_attention_with_an_input_requiring_grad_answers_eagers_strides(server) -> None:
    """break41 F3: frozen, eager leaves MHA's fused path only where an input requires grad (the client answered the
    fused path's strides); trainable, always with grad. Under ``no_grad`` both take it."""
    for frozen in (True, False):
        _attention_strides_as_eager(server, frozen)


def test_as_callers_keeps_memory_objects_and_lazy_bits() -> None:
    """The rule on its own: no copy; one object for a leaf that was one object twice; a lazily conjugated or negated
    output keeps its bit; a view of an input and a constant are left alone; inside ``inference_mode`` the other way."""
    from modelgraph.out_layout import as_callers

    x = torch.randn(3, 4)
    z = torch.randn(3, 4, dtype=torch.complex64)
    const = torch.randn(2)
    with torch.inference_mode():
        h = x * 2
        leaves = [h, h, h.t(), (z * 1).conj(), torch._neg_view(x * 1), torch.empty(0, 3), x.t(), const]
    out = as_callers(list(leaves), [True] * 7 + [False], [x])
    assert [t.is_inference() for t in out] == [False] * 8
    assert out[0] is out[1] and out[0] is not h and out[0].data_ptr() == h.data_ptr() == out[2].data_ptr()
    assert out[3].is_conj() and torch.equal(out[3], leaves[3]) and out[4].is_neg() and torch.equal(out[4], leaves[4])
    assert out[6] is leaves[6] and out[7] is const
    out[0].mul_(2)
    assert torch.equal(out[2], out[0].t()) and torch.equal(out[0], x * 4)
    with torch.inference_mode():
        back = as_callers([out[0], x.t(), x * 1], [True] * 3, [x])
        assert [t.is_inference() for t in back] == [True, False, True] and back[0].data_ptr() == h.data_ptr()
