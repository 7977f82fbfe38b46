"""Inputs and outputs users pass that the capture changed (session 22, review22's findings 1-4).

1. An input sliced with gaps (non-dense strides) was copied dense before the graph ran, so a forward that branches
   on ``x.is_contiguous()`` or ``x.stride()`` answered the dense branch (0.62 and 8.01 off eager, locally and
   through a server). A forward whose code reads strides (``modelgraph.pytree_io.reads_layout``) now keys each
   non-dense input by its own strides and is captured on them.
2. A sparse (COO, CSR) or quantized input raised torch's RuntimeError from the layout copy.
3. A forward returning ``(y, y.shape)`` was refused with a TreeSpec dump.
4. ``.item()`` of a parameter was refused as "branches on a tensor's value" without naming the weight.

Every split here runs through a real server (``tests/conftest.py``'s ``server``), cold then warm, and equals the
eager module (``assert_as_eager``: structure, strides, values bit for bit against ``client.reference``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_user_zoo_splits import FAST, assert_as_eager
from ue_client import CoinferClient, new_tenant


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eager(m: nn.Module, *args):
    with torch.no_grad():
        return m(*args)


class Contig(nn.Module):
    """Doubles its output for a non-contiguous input (review22 p3 ``t_contig``)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x).relu() * (1.0 if x.is_contiguous() else 2.0)


class Stride(nn.Module):
    """Scales its output by the input's first stride (review22 p3 ``t_stride``)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x).relu() * float(x.stride(0))


def _layouts(seed: int) -> list[tuple[str, torch.Tensor]]:
    """A [2, 4] float32 input in the layouts users pass: contiguous, sliced with gaps (two patterns), a row slice
    (no gaps inside a row), transposed (dense)."""
    return [("contiguous", torch.randn(2, 4, generator=_g(seed))),
            ("every 2nd column", torch.randn(2, 8, generator=_g(seed + 1))[:, ::2]),
            ("row slice", torch.randn(2, 8, generator=_g(seed + 2))[:, :4]),
            ("transposed", torch.randn(4, 2, generator=_g(seed + 4)).t())]


@pytest.mark.parametrize("cls", [Contig, Stride])
def test_a_forward_reading_its_input_strides_equals_eager_locally(cls):
    """Fails before session 22: the sliced inputs came out 0.62 (Contig) / 8.01 (Stride) off eager."""
    torch.manual_seed(0)
    m = cls().eval()
    with CoinferClient(m, (_layouts(0)[1][1],)) as c:  # captured with a sliced example
        for rep in range(2):
            for what, x in _layouts(10 * rep):
                assert_as_eager(c(x), _eager(m, x), c.reference(x), (cls.__name__, what, rep))


@pytest.mark.parametrize(("cls", "server_ops"), [(Contig, 0), (Stride, 1)], ids=["offload", "split"])
def test_a_forward_reading_its_input_strides_splits_as_eager_then_falls_back(cls, server_ops):
    """Through a real server (the whole model there: the sliced input crosses the wire; or a split after the
    first op), cold then warm, then the server stopped: the fallback answers as eager too."""
    from edge_server.testing import ServerThread

    torch.manual_seed(0)
    m = cls().eval()
    srv = ServerThread(threads=1).start()
    try:
        c = CoinferClient(m, (torch.randn(2, 4),), server=srv.address, policy="offload", server_ops=server_ops,
                          link=FAST, tenant=new_tenant(), profile_runs=2, probe=False, timeout_ms=20_000)
        for rep in range(2):
            for what, x in _layouts(10 * rep):
                y = c(x)
                assert c.last_report.server_ops > 0 and not c.last_report.fallback, (what, c.last_report)
                assert_as_eager(y, _eager(m, x), c.reference(x), (cls.__name__, what, rep))
    finally:
        srv.stop()
    try:
        for what, x in _layouts(30):
            y = c(x)
            assert c.last_report.fallback, (what, c.last_report)
            assert_as_eager(y, _eager(m, x), c.reference(x), (cls.__name__, "fallback", what))
    finally:
        c.close()


class StrideSetting(nn.Module):
    """Reads a setting named ``stride`` (``self.stride == 1``, as torchvision's shufflenet_v2 blocks do), not an
    input's strides."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.stride = 1

    def forward(self, x):
        return self.l(x) if self.stride == 1 else self.l(x)[:, ::2]


@pytest.mark.parametrize("m", [nn.Sequential(nn.Linear(4, 4), nn.ReLU()), StrideSetting()], ids=["plain", "setting"])
def test_a_forward_not_reading_strides_runs_a_slice_on_its_first_graph(m):
    """A slice's strides alone are no new layout for a forward that does not read them (session 17): no capture
    per slice pattern."""
    torch.manual_seed(0)
    m = m.eval()
    with CoinferClient(m, (torch.randn(2, 4),)) as c:
        for what, x in _layouts(0):
            if what != "transposed":
                assert_as_eager(c(x), _eager(m, x), c.reference(x), what)
        assert c._signatures.misses == 0


class ShapeOut(nn.Module):
    """Returns its output's shape beside it, and an input size in a dict (review22 p6: refused with a TreeSpec
    dump before session 22)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor):
        y = self.l(x)
        return y, y.shape, {"rows": x.size(0), "row": x[0].shape}


def _same_sizes(y, e, what) -> None:
    assert type(y[1]) is torch.Size and y[1] == e[1], (what, y[1], e[1])
    assert type(y[2]["row"]) is torch.Size and y[2] == e[2], (what, y[2], e[2])


def test_a_shape_in_the_output_comes_back_a_torch_size_through_a_server_and_its_fallback():
    """Cold, warm, another batch size (captured again: the shape is a constant of each signature's graph, exact),
    then the server stopped: every answer has eager's ``torch.Size`` and values."""
    from edge_server.testing import ServerThread

    torch.manual_seed(0)
    m = ShapeOut().eval()
    srv = ServerThread(threads=1).start()
    try:
        c = CoinferClient(m, (torch.randn(2, 4),), server=srv.address, policy="offload", server_ops=0, link=FAST,
                          tenant=new_tenant(), profile_runs=2, probe=False, timeout_ms=20_000)
        for j, rows in enumerate((2, 2, 3)):
            x = torch.randn(rows, 4, generator=_g(j))
            y = c(x)
            assert c.last_report.server_ops > 0 and not c.last_report.fallback, c.last_report
            e = _eager(m, x)
            _same_sizes(y, e, j)
            assert_as_eager(y, e, c.reference(x), j)
    finally:
        srv.stop()
    try:
        x = torch.randn(2, 4, generator=_g(9))
        y = c(x)
        assert c.last_report.fallback, c.last_report
        e = _eager(m, x)
        _same_sizes(y, e, "fallback")
        assert_as_eager(y, e, c.reference(x), "fallback")
    finally:
        c.close()


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "nested"])
def test_a_sparse_or_nested_input_is_an_input_error_naming_it(server, kind):
    """review22 p6b: torch's RuntimeError ("unsupported memory format option Contiguous", "Sparse CSR tensors do
    not have strides") from the layout copy. Now an InputError naming the input and ``to_dense``; the client
    answers the next dense call through the server as eager."""
    from ue_client import InputError

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    odd = {"sparse_coo": lambda: x.to_sparse(), "sparse_csr": lambda: x.to_sparse_csr(),
           "nested": lambda: torch.nested.nested_tensor([x[0], x[1]])}[kind]()
    with CoinferClient(m, (x,), server=server.address, policy="offload", server_ops=0, link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        fix = r"to_padded_tensor" if kind == "nested" else r"to_dense"
        with pytest.raises(InputError, match=rf"input 'input' \(args\[0\]\) is a .*{fix}"):
            c(odd)
        y = c(x)
        assert c.last_report.server_ops > 0
        assert_as_eager(y, _eager(m, x), c.reference(x), kind)


class WeightBranch(nn.Module):
    """``if self.t.item() > 0`` (review22 p7: refused as "branches on a tensor's value", naming neither the weight
    nor the fix)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.t = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.l(x) if self.t.item() > 0 else -self.l(x)


class WeightScale(nn.Module):
    """``x / self.t.item()`` of a buffer: exported as an ``aten.item`` node read from the buffer alone."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.register_buffer("t", torch.tensor(2.0))

    def forward(self, x):
        return self.l(x) / self.t.item()


class InputBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return self.l(x) if x.sum() > 0 else -self.l(x)


class InputScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return self.l(x) * x.max().item()


@pytest.mark.parametrize(("cls", "match"), [
    (WeightBranch, r"WeightBranch branches on a tensor's value at test_user_inputs22\.py:\d+ in WeightBranch\.forward "
                   r"\(`return self\.l\(x\) if self\.t\.item\(\) > 0 else -self\.l\(x\)`\), a line that reads its "
                   r"weight WeightBranch\.t: .*torch\.where\(self\.t > 0, a, b\).*x / self\.t"),
    (WeightScale, r"WeightScale reads the value of its weight WeightScale\.t into Python .*x / self\.t.*"
                  r"torch\.where\(self\.t > 0"),
    (InputBranch, r"InputBranch branches on a tensor's value at test_user_inputs22\.py:\d+ in InputBranch\.forward "
                  r"\(`return self\.l\(x\) if x\.sum\(\) > 0 else -self\.l\(x\)`\) \(a Python if"),
    (InputScale, r"InputScale reads a tensor's value of input x into Python"),
], ids=["weight branch", "weight item", "input branch", "input item"])
def test_a_value_read_names_the_line_and_the_weight(cls, match):
    """The refusal names where and, for a weight (a value fixed at capture, not an input's), which one and how to
    keep it a tensor. Fails before session 22 (no line, no weight)."""
    from ue_client import InputError

    with pytest.raises(InputError, match=match) as e:
        CoinferClient(cls().eval(), (torch.randn(2, 4),))
    assert "\n" not in str(e.value)


class WeightWhere(nn.Module):
    """``WeightBranch`` and ``WeightScale`` as the refusals say to write them: the weight kept a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.t = nn.Parameter(torch.tensor(-2.0))

    def forward(self, x):
        y = self.l(x)
        return torch.where(self.t > 0, y, -y) / self.t


def test_the_weight_kept_a_tensor_splits_as_eager(server):
    torch.manual_seed(0)
    m = WeightWhere().eval()
    with CoinferClient(m, (torch.randn(2, 4),), server=server.address, policy="offload", server_ops=1, link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        for j in range(2):
            x = torch.randn(2, 4, generator=_g(40 + j))
            y = c(x)
            assert c.last_report.server_ops > 0 and not c.last_report.fallback, c.last_report
            assert_as_eager(y, _eager(m, x), c.reference(x), j)


class DtypeOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        y = self.l(x)
        return y, y.dtype


def test_a_dtype_in_the_output_is_refused_naming_it_not_as_a_class():
    """Before session 22: "a torch.dtype (a dataclass or class torch's pytrees do not know) ... register the
    class", a fix that does not apply to torch's own constants."""
    from ue_client import InputError

    with pytest.raises(InputError, match=r"DtypeOut returns a torch\.dtype, a constant torch\.export refuses in an "
                                         r"output .*y\.dtype") as e:
        CoinferClient(DtypeOut().eval(), (torch.randn(2, 4),))
    assert "register" not in str(e.value)
