"""Capture of users' models as they come: pytree inputs/outputs, aliased examples, strided inputs, refusals.

Every check compares with the user's eager module (the reference for "correct", DESIGN §4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modelgraph import CaptureError, capture
from modelgraph.errors import InputSpecError
from modelgraph.execute import run_graph
from modelgraph.pytree_io import signature


def _eager(m: nn.Module, *args, **kwargs):
    with torch.no_grad():
        return m(*args, **kwargs)


def _assert_same_tree(got, want) -> None:
    g_leaves, g_spec = torch.utils._pytree.tree_flatten(got)
    w_leaves, w_spec = torch.utils._pytree.tree_flatten(want)
    assert g_spec == w_spec
    for a, b in zip(g_leaves, w_leaves):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert a == b


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.feat = nn.Linear(4, 2)

    def forward(self, batch: dict, scale: float = 2.0):
        y = self.fc(batch["x"]) * scale
        return {"logits": y, "aux": None, "n": 3, "parts": [self.feat(batch["x"]), (batch["extra"][0] + 1,)]}


class TupleNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), None


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fa = nn.Linear(4, 4)
        self.fb = nn.Linear(4, 4)

    def forward(self, a, b):
        return self.fa(a) + self.fb(b)


class Flattens(nn.Module):
    """Flattens with view: fails on a non-contiguous input unless the boundary fixes the layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).view(x.shape[0], -1))


def test_dict_list_none_and_constant_outputs_keep_the_model_structure():
    torch.manual_seed(0)
    m = DictOut().eval()
    ex = ({"x": torch.randn(2, 4), "extra": [torch.randn(2)]}, 2.0)
    g = capture(m, ex)
    assert g.eager_max_diff == 0.0
    x2 = {"extra": [torch.randn(2)], "x": torch.randn(2, 4)}  # another key order: matched by key
    _assert_same_tree(run_graph(g, (x2, 2.0)), _eager(m, x2, 2.0))
    out = run_graph(g, (x2, 2.0))
    assert out["aux"] is None and out["n"] == 3 and isinstance(out["parts"], list)


def test_none_leaf_in_output_tuple():
    m = TupleNone().eval()
    x = torch.randn(2, 4)
    g = capture(m, (x,))
    out = run_graph(g, (x,))
    assert isinstance(out, tuple) and out[1] is None
    torch.testing.assert_close(out[0], _eager(m, x)[0], rtol=0, atol=0)


def test_kwargs_inputs():
    m = TwoBranch().eval()
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    g = capture(m, (a,), kwargs={"b": b})
    torch.testing.assert_close(run_graph(g, (b,), kwargs={"b": a}), _eager(m, b, b=a), rtol=0, atol=0)


@pytest.mark.parametrize("aliasing", ["same_tensor", "overlapping_views"])
def test_aliased_example_inputs_get_their_own_placeholders(aliasing):
    m = TwoBranch().eval()
    x, base = torch.randn(2, 4), torch.randn(2, 6)
    ex = (x, x) if aliasing == "same_tensor" else (base[:, :4], base[:, 2:6])
    g = capture(m, ex)
    assert len(g.inputs) == 2
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(run_graph(g, (a, b)), _eager(m, a, b), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["permuted_hwc", "channels_last"])
def test_strided_inputs_give_the_model_result_bitwise(layout):
    torch.manual_seed(0)
    m = Flattens().eval()
    g = capture(m, (torch.randn(2, 3, 8, 8),))
    x = (
        torch.randn(2, 8, 8, 3).permute(0, 3, 1, 2)
        if layout == "permuted_hwc"
        else torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    )
    assert not x.is_contiguous()
    got = run_graph(g, (x,))
    torch.testing.assert_close(got, run_graph(g, (x.contiguous(),)), rtol=0, atol=0)
    torch.testing.assert_close(got, _eager(m, x.contiguous()), rtol=0, atol=0)


def test_dtype_mismatch_is_a_value_error_naming_input_and_dtypes():
    m = TwoBranch().eval()
    g = capture(m, (torch.randn(2, 4), torch.randn(2, 4)))
    with pytest.raises(ValueError, match=r"'b'.*float64.*float32"):
        run_graph(g, (torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64)))
    with pytest.raises(InputSpecError, match="shape"):
        run_graph(g, (torch.randn(3, 4), torch.randn(2, 4)))
    with pytest.raises(InputSpecError, match="entries"):
        run_graph(g, (torch.randn(2, 4),))


def test_numpy_inputs_are_tensors_of_their_own_dtype():
    m = TwoBranch().eval()
    g = capture(m, (torch.randn(2, 4), torch.randn(2, 4)))
    a, b = np.random.default_rng(0).standard_normal((2, 2, 4)).astype(np.float32)
    torch.testing.assert_close(
        run_graph(g, (a, b)), _eager(m, torch.from_numpy(a), torch.from_numpy(b)), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="float64"):
        run_graph(g, (a.astype(np.float64), b))


def test_float64_and_int_inputs():
    class IntEmb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4).double()

        def forward(self, ids, w):
            return self.emb(ids) * w

    m = IntEmb().eval()
    ids, w = torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 4, dtype=torch.float64)
    g = capture(m, (ids, w))
    torch.testing.assert_close(run_graph(g, (ids, w)), _eager(m, ids, w), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"int32.*int64"):
        run_graph(g, (ids.int(), w))


class NonZero(nn.Module):
    def forward(self, x):
        return x.nonzero()


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Item(nn.Module):
    def forward(self, x):
        return x * x.sum().item()


class MutatesInput(nn.Module):
    def forward(self, x):
        x.add_(1)
        return x * 2


class MutatesBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls += 1
        return x * 2


class ObjectOut(nn.Module):
    def forward(self, x):
        return object()


class Random(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.mark.parametrize(
    ("cls", "hint"),
    [
        (NonZero, r"depends on the input values.*fixed-size"),
        (Branchy, r"branches on a tensor's value.*torch\.cond"),
        (Item, r"\.item\(\).*tensors"),
        (MutatesInput, r"mutates its input.*clone"),
        (MutatesBuffer, r"updates its buffer 'calls'.*\.eval\(\)"),
        (ObjectOut, r"unsupported value.*return tensors"),
        (Random, r"Random draws random numbers \(aten\.rand_like\.default\)"),
    ],
)
def test_capture_refusals_are_one_line_with_a_hint(cls, hint, capfd):
    with pytest.raises(CaptureError, match=hint) as ei:
        capture(cls().eval(), (torch.randn(3, 4),))
    assert "\n" not in str(ei.value)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "def forward" not in err and "W1" not in err, err[:500]


def test_signature_distinguishes_shapes_dtypes_and_structure():
    x = torch.randn(1, 3)
    assert signature((x,)) == signature((torch.zeros(1, 3),))
    assert signature((x,)) != signature((torch.randn(4, 3),))
    assert signature((x,)) != signature((x.double(),))
    assert signature(({"a": x},)) != signature(({"b": x},))


def test_a_dataclass_output_is_refused_naming_the_registration_and_runs_once_registered():
    """An unregistered dataclass output is refused with the fix (register it); once registered with
    ``torch.utils._pytree.register_dataclass`` every path returns that class (session 16, newuser16)."""
    import dataclasses

    from ue_client import CoinferClient, InputError

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        hidden: torch.Tensor

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return Out(self.fc(x), x * 2)

    net, x = Net().eval(), torch.randn(2, 4)
    with pytest.raises(InputError, match="register_dataclass / register_pytree_node"):
        CoinferClient(net, (x,))
    torch.utils._pytree.register_dataclass(Out)
    try:
        y = CoinferClient(net, (x,))(x)
        assert type(y) is Out and torch.equal(y.logits, net(x).logits) and torch.equal(y.hidden, x * 2)
    finally:
        torch.utils._pytree._deregister_pytree_node(Out)
