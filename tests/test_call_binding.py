"""Call the client like the model: arguments bound as Python binds them to the user's ``forward``
(``modelgraph.pytree_io.rebind_call``), whatever form the model was captured with.

Before, ``client(xs, bias=bias)`` for a model captured with ``(xs, bias)`` was refused ("kwargs has keys
['bias'] the model was not captured with"), though the README says call the client like the model. Each
case is compared with the user's own eager module called the same way.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from ue_client import CoinferClient, InputError, new_tenant
from ue_client.verify import max_abs_diff

G = torch.Generator().manual_seed(3)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


class ListAndBias(nn.Module):
    """``forward(xs, bias=None)``: a list and an optional tensor, a dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, xs: list[torch.Tensor], bias: torch.Tensor | None = None):
        h = xs[0] * 0.5 + xs[1]
        if bias is not None:
            h = h + bias
        return {"y": self.lin(h), "s": h.sum(-1)}


class DefaultsAndKwOnly(nn.Module):
    """``forward(x, scale=2.0, *, shift)``: a defaulted constant and a keyword-only tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: float = 2.0, *, shift: torch.Tensor):
        return self.lin(x * scale + shift)


class VarArgs(nn.Module):
    """``forward(x, *rest, gain=1.0)``: extra positional tensors, a keyword-only constant."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, *rest: torch.Tensor, gain: float = 1.0):
        for r in rest:
            x = x + r
        return self.lin(x) * gain


class VarKw(nn.Module):
    """``forward(x, /, y, **extra)``: a positional-only tensor, and keyword tensors by name."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, /, y: torch.Tensor, **extra: torch.Tensor):
        return self.lin(x - y + extra["bias"]), (extra["bias"] * 2,)


def same(a, b) -> None:
    """Equal in structure and values within the capture tolerance (the user's eager module is the truth)."""
    assert type(a) is type(b)
    assert max_abs_diff(a, b) <= 1e-5, max_abs_diff(a, b)


def test_keyword_for_a_captured_positional_and_other_signatures_locally() -> None:
    m = ListAndBias().eval()
    xs, bias = [rnd(2, 8), rnd(2, 8)], rnd(8)
    with CoinferClient(m, (xs, bias), policy="local") as c:
        want = m(xs, bias)
        for out in (c(xs, bias), c(xs, bias=bias), c(xs=xs, bias=bias), c(bias=bias, xs=xs)):
            same(out, want)
        same(c.reference(xs, bias=bias), want)
        with pytest.raises(InputError, match="missing a required argument"):
            c(bias=bias)
        with pytest.raises(InputError, match="unexpected keyword"):
            c(xs, bias=bias, gain=2)

    m2 = DefaultsAndKwOnly().eval()
    x, shift = rnd(3, 8), rnd(8)
    from modelgraph import capture

    g = capture(m2, (x,), kwargs={"shift": shift}, name="kwonly")
    with CoinferClient(g, policy="local") as c:  # a captured graph alone: no forward to bind against
        same(c(x, shift=shift), m2(x, shift=shift))
    m3 = VarArgs().eval()
    a, b, d = rnd(2, 8), rnd(2, 8), rnd(2, 8)
    with CoinferClient(m3, (a, b, d), policy="local") as c:
        want = m3(a, b, d)
        same(c(a, b, d), want)
        same(c(a, b, d, gain=1.0), want)  # the default the capture took: accepted
        # another value of an argument the capture left at its default, fewer *rest: refused before session 17,
        # now captured once more in the call's own form (``CoinferClient._form``)
        same(c(a, b, d, gain=3.0), m3(a, b, d, gain=3.0))
        same(c(a, b), m3(a, b))
    c = CoinferClient(g, policy="local")  # a graph alone cannot be captured again: refused
    with pytest.raises(InputError, match=r"keys \['scale'\] the model was not captured with"):
        c(x, shift=shift, scale=3.0)


def test_defaults_keyword_only_and_var_keyword_captured_as_keywords() -> None:
    """Models captured with keyword arguments (``ModelGraph`` from ``capture(..., kwargs=)``, then a client of
    the module with the same signature through ``SignatureCache``): positional where the capture used a
    keyword and the reverse, a default given explicitly, ``**extra`` entries by name."""
    m2 = DefaultsAndKwOnly().eval()
    x, shift = rnd(3, 8), rnd(8)

    class Wrap(nn.Module):  # forward(x, shift, scale=2.0): the capture passes shift positionally
        def __init__(self) -> None:
            super().__init__()
            self.inner = m2

        def forward(self, x, shift, scale: float = 2.0):
            return self.inner(x, scale, shift=shift)

    w = Wrap().eval()
    with CoinferClient(w, (x, shift), policy="local") as c:
        want = w(x, shift)
        for out in (c(x, shift), c(x, shift=shift), c(shift=shift, x=x), c(x, shift, 2.0), c(x, shift, scale=2.0)):
            same(out, want)
        same(c(x, shift, scale=3.0), w(x, shift, scale=3.0))  # refused before session 17: its own capture now
    m4 = VarKw().eval()
    x, y, bias = rnd(2, 8), rnd(2, 8), rnd(8)

    class Wrap4(nn.Module):  # captured positionally, (x, y, bias)
        def __init__(self) -> None:
            super().__init__()
            self.inner = m4

        def forward(self, x, /, y, bias):
            return self.inner(x, y, bias=bias)

    w4 = Wrap4().eval()
    with CoinferClient(w4, (x, y, bias), policy="local") as c:
        want = w4(x, y, bias)
        for out in (c(x, y, bias), c(x, y=y, bias=bias), c(x, bias=bias, y=y)):
            same(out, want)
        with pytest.raises(InputError, match="positional only"):
            c(x=x, y=y, bias=bias)


def test_keyword_call_offloaded_cold_and_warm_equals_the_eager_module() -> None:
    """The issue's case through a real server on a free port: ``client(xs, bias=bias)`` offloaded (cold,
    then warm, then positionally), no fallback, equal to ``model(xs, bias=bias)`` in its structure."""
    m = ListAndBias().eval()
    xs, bias = [rnd(2, 8), rnd(2, 8)], rnd(8)
    cfg = ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB)
    with ServerThread(config=cfg, threads=1) as srv, \
            CoinferClient(m, (xs, bias), server=srv.address, policy="offload", tenant=new_tenant(),
                          link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, fallback=False) as c:
        for i in range(3):
            args = [rnd(2, 8), rnd(2, 8)]
            out = c(args, bias=bias) if i < 2 else c(xs=args, bias=bias)
            assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
            same(out, m(args, bias=bias))


class TwoOptional(nn.Module):
    """``forward(x, a=None, b=None, scale=1.0)``: the keyword style users mix."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, a=None, b=None, scale=1.0):
        h = self.lin(x) * scale
        if a is not None:
            h = h + a
        if b is not None:
            h = h * b
        return h


def test_the_same_call_in_another_keyword_order_or_style_is_one_form():
    """review17 F1: ``c(x, b=b, a=a)`` of a model captured with ``(x, a=a, b=b)`` was a form of its own (a second
    capture, engine and server session: 436 ms against 7 for a warm call), and ``c(x, a, b, 2.0)`` /
    ``c(x, a=a, b=b, scale=2.0)`` two more; the cache keeps 4 forms, so code mixing styles re-captured for ever.
    Now keywords are put back in the captured order, and a call in another form is bound by Python's own rules
    before its signature is taken. Each answer equals the eager module's."""
    m = TwoOptional().eval()
    x, a, b = rnd(2, 8), rnd(2, 8), rnd(2, 8)
    c = CoinferClient(m, (x,), example_kwargs={"a": a, "b": b})
    calls = [((x,), {"b": b, "a": a}), ((x,), {"a": a, "b": b}), ((x, a, b, 2.0), {}),
             ((x,), {"a": a, "b": b, "scale": 2.0}), ((x, a), {"b": b, "scale": 2.0}),
             ((x,), {"scale": 2.0, "b": b, "a": a})]
    for args, kwargs in calls:
        with torch.inference_mode():
            want = m(*args, **kwargs)
        assert max_abs_diff(c(*args, **kwargs), want) == 0, (args, kwargs)
    assert c._signatures.misses == 1, c._signatures.misses  # scale=2.0: one form, whatever its style
