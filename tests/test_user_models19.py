"""Session 19: users' models a reviewer broke in session 18's refusals, each compared with the user's own eager
module through a real edge server (port 0) where a split is involved.

- Float models written for later quantization (``torch.ao.nn.quantized.FloatFunctional`` / ``FXFloatFunctional``
  skip adds, torchvision's ``quantization.mobilenet_v2(quantize=False)``) are captured and split as eager (before:
  refused as "a quantized module").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_user_zoo_splits import FAST, assert_as_eager
from ue_client import CoinferClient, InputError, new_tenant


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eager(module, args, kwargs=None):
    with torch.no_grad():
        return module(*args, **(kwargs or {}))


def _split_as_eager(server, m: nn.Module, a: tuple, calls: int = 3) -> None:
    """Full offload of ``m`` through ``server``: ``calls`` calls (cold, then warm on fresh inputs), each as eager."""
    with CoinferClient(m, a, server=server.address, policy="offload", server_ops=0, link=FAST, tenant=new_tenant(),
                       profile_runs=2, fallback=False, probe=False) as c:
        for j in range(calls):
            args = a if j == 0 else tuple(torch.randn(t.shape, generator=_g(100 + j)) for t in a)
            y = c(*args)
            assert c.last_report.server_ops > 0 and not c.last_report.fallback, c.last_report
            assert_as_eager(y, _eager(m, args), c.reference(*args), j)


# ---- float modules under torch.ao.nn.quantized -------------------------------------------------------------
class FloatSkips(nn.Module):
    """Skip add, add_relu, mul, add_scalar and cat through ``FloatFunctional`` / ``FXFloatFunctional``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.ff = torch.ao.nn.quantized.FloatFunctional()
        self.fx = torch.ao.nn.quantized.FXFloatFunctional()

    def forward(self, x):
        y = self.ff.add(self.fc(x), x)
        y = self.fx.add_relu(y, x)
        y = self.ff.mul(y, x)
        y = self.fx.add_scalar(y, 0.5)
        return self.ff.cat([y, x], dim=1)


def test_float_functional_skip_adds_are_captured_and_split_as_eager(server):
    """Before: "FloatSkips.ff is a quantized module (...FloatFunctional...)" at capture."""
    torch.manual_seed(60)
    _split_as_eager(server, FloatSkips().eval(), (torch.randn(2, 8, generator=_g(61)),))


def test_torchvision_quantizable_mobilenet_v2_in_float_is_captured_as_eager():
    from modelgraph.tv_compat import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(62)
    m = tv.models.quantization.mobilenet_v2(weights=None, quantize=False).eval()
    x = torch.randn(1, 3, 32, 32, generator=_g(63))
    c = CoinferClient(m, (x,))
    assert_as_eager(c(x), _eager(m, (x,)), c.reference(x), "mobilenet_v2 quantizable, float")


def test_a_converted_quantized_model_is_still_refused():
    """Only the float modules are let through: a statically quantized model (``torch.ao.quantization.convert``)
    is refused naming the quantized module."""
    m = nn.Sequential(torch.ao.quantization.QuantStub(), nn.Linear(4, 4), torch.ao.quantization.DeQuantStub()).eval()
    m.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    torch.ao.quantization.prepare(m, inplace=True)
    m(torch.randn(8, 4, generator=_g(64)))
    torch.ao.quantization.convert(m, inplace=True)
    with pytest.raises(InputError, match=r"Sequential\.0 is a quantized module \(torch\.ao\.nn\.quantized\.modules\."
                                         r"Quantize, "):
        CoinferClient(m, (torch.randn(2, 4, generator=_g(65)),))
