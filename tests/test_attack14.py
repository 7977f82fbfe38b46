"""Session 14's attack from outside (attack14): what a new user and a stranger found after session 13.

A module's structure changed after the client was built (a submodule replaced, an activation swapped, a
layer appended to a ``ModuleList``, ``forward`` set on the instance, a forward hook or pre-hook registered)
was not watched by ``ue_client.model.WeightWatch`` / ``modelgraph.pystate``: every path kept the captured
graph while the user's ``model(x)`` ran the new structure (0.18-9.3 max|diff|, a silently wrong answer).
Now the call is refused in one line naming what changed (``modelgraph.pystate._Structure``). So is a constant
changed outside plain attributes (in a list, a dict, a namespace or dataclass config, a transposed tensor
attribute) and state added after the client was built that a forward reads with a default
(``getattr(self, "scale", 1.0)``).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from torch import nn

from tests.checks import warm_client
from ue_client import CoinferClient, InputError, new_tenant
from ue_client.verify import max_abs_diff

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.squash = Tanhish()
        self.layers = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.squash(self.act(self.fc(x)))
        for layer in self.layers:
            y = layer(y)
        return y


_HANDLES: list = []
_PATCHED: list = []


class Tanhish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


def _change(module: Net, how: str) -> None:
    if how == "submodule":
        module.fc = nn.Linear(6, 6)
    elif how == "activation":
        module.act = nn.Tanh()
    elif how == "append":
        module.layers.append(nn.Linear(6, 6))
    elif how == "forward":
        module.forward = lambda x: x * 3.0  # type: ignore[method-assign]
    elif how == "hook":
        _HANDLES.append(module.register_forward_hook(lambda m, i, o: o * 2.0))
    elif how == "pre_hook":
        _HANDLES.append(module.layers[1].register_forward_pre_hook(lambda m, i: (i[0] + 1.0,)))
    elif how == "class_forward":
        _PATCHED.append((Tanhish, Tanhish.forward))
        Tanhish.forward = lambda self, x: torch.sigmoid(x)  # type: ignore[method-assign]
    elif how == "global_hook":
        _HANDLES.append(nn.modules.module.register_module_forward_hook(lambda m, i, o: None if m is not module
                                                                       else o + 1.0))


@pytest.mark.parametrize("how", ["submodule", "activation", "append", "forward", "class_forward", "hook", "pre_hook",
                                 "global_hook"])
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_a_structure_changed_after_the_client_was_built_is_refused(server, policy: str, how: str) -> None:
    module = Net().eval()
    x = torch.randn(3, 6)
    try:
        with warm_client(server, module, x, policy) as (c, y):
            _change(module, how)
            with torch.inference_mode():
                assert max_abs_diff(y, module(x)) > 1e-3  # the change changes the user's own answer
            with pytest.raises(InputError, match="after the client captured the model"):
                c(x)
            with pytest.raises(InputError, match="after the client captured the model"):
                c.reference(x)
    finally:
        while _HANDLES:
            _HANDLES.pop().remove()
        while _PATCHED:
            cls, fw = _PATCHED.pop()
            cls.forward = fw


def test_ordinary_structures_are_not_refused() -> None:
    """Hooks present at capture, a submodule set back to the same object, parametrizations, quantization
    stubs, a non-persistent buffer and the user's own eager calls between client calls: no refusal."""
    import torch.nn.utils.parametrize as parametrize
    from torch.ao.quantization import DeQuantStub, QuantStub

    class Symmetric(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.triu() + w.triu(1).t()

    class Quantish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.fc, self.dq = QuantStub(), nn.Linear(6, 6), DeQuantStub()
            parametrize.register_parametrization(self.fc, "weight", Symmetric())
            self.register_buffer("k", torch.arange(6.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dq(self.fc(self.q(x))) * self.k

    module = Quantish().eval()
    kept: list = []
    module.register_forward_hook(lambda m, i, o: kept.append(o.shape))
    x = torch.randn(2, 6)
    with CoinferClient(module, (x,)) as c:
        for _ in range(3):
            y = c(x)
            with torch.inference_mode():
                assert max_abs_diff(y, module(x)) == 0.0
            module.fc = module.fc  # the same object again


@dataclasses.dataclass
class Config:
    temperature: float = 2.0
    name: str = "cfg"
    on_done: object = print  # a field of another kind: not watched


class Constants(nn.Module):
    """Constants a forward reads from outside plain attributes: a transposed tensor attribute (lifted as a
    contiguous copy), tensors in a list and a dict, a namespace's tensor and a dataclass config's scalar."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.t = torch.randn(6, 6, generator=g).t()
        self.consts = [torch.randn(6, generator=g)]
        self.table = {"bias": torch.randn(6, generator=g)}
        self.ns = types.SimpleNamespace(shift=torch.randn(6, generator=g), k=3)
        self.cfg = Config()
        self.cache = [torch.zeros(1)]  # an activation kept per call: never read by the graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.t) * self.consts[0] + self.table["bias"] + self.ns.shift * self.ns.k
        self.cache[0] = y.detach()
        return y / self.cfg.temperature


def _change_constant(module: Constants, how: str) -> None:
    if how == "transposed_in_place":
        module.t.mul_(2.0)
    elif how == "list_replaced":
        module.consts[0] = torch.ones(6)
    elif how == "dict_replaced":
        module.table["bias"] = torch.ones(6)
    elif how == "namespace_tensor":
        module.ns.shift = torch.ones(6)
    elif how == "namespace_scalar":
        module.ns.k = 5
    elif how == "dataclass_scalar":
        module.cfg.temperature = 0.5


@pytest.mark.parametrize("how", ["transposed_in_place", "list_replaced", "dict_replaced", "namespace_tensor",
                                 "namespace_scalar", "dataclass_scalar"])
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_a_constant_changed_outside_plain_attributes_is_refused(server, policy: str, how: str) -> None:
    """Before: every path kept the captured constant (1.9-6.3 max|diff| from ``model(x)``); an activation the
    forward keeps in a list and a config field of another kind are no change."""
    module = Constants().eval()
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        module.cfg.on_done = repr
        assert max_abs_diff(c(x), y) == 0.0
        _change_constant(module, how)
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) > 1e-3
        with pytest.raises(InputError, match="after the client captured"):
            c(x)



class Optional(nn.Module):
    """Reads optional state with a default: the graph saw it missing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) * getattr(self, "scale", 1.0)
        b = getattr(self, "extra_bias", None)
        return y if b is None else y + b


def _add(module: Optional, how: str) -> None:
    if how == "number":
        module.scale = 3.0
    elif how == "buffer":
        module.register_buffer("extra_bias", torch.ones(6))
    elif how == "parameter":
        module.register_parameter("extra_bias", nn.Parameter(torch.ones(6)))
    elif how == "tensor":
        module.extra_bias = torch.ones(6)


@pytest.mark.parametrize("how", ["number", "buffer", "parameter", "tensor"])
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_state_added_after_the_client_was_built_is_refused(server, policy: str, how: str) -> None:
    """Before: every path answered without it (1.0-1.7 max|diff| from ``model(x)``); metadata of another kind
    (a list of class names) added to the module is no change."""
    module = Optional().eval()
    x = torch.randn(3, 6)
    with CoinferClient(module, (x,), server=server.address, policy=policy, link=FAST, tenant=new_tenant(),
                       profile_runs=2, fallback=False) as c:
        y = c(x)
        module.class_names = ["cat", "dog"]
        assert max_abs_diff(c(x), y) == 0.0
        _add(module, how)
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) > 1e-3
        with pytest.raises(InputError, match="added after capture"):
            c(x)
