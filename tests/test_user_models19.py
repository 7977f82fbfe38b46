"""Session 19: users' models a reviewer broke in session 18's refusals, each compared with the user's own eager
module through a real edge server (port 0) where a split is involved.

- Float models written for later quantization (``torch.ao.nn.quantized.FloatFunctional`` / ``FXFloatFunctional``
  skip adds, torchvision's ``quantization.mobilenet_v2(quantize=False)``) are captured and split as eager (before:
  refused as "a quantized module").
- Python-level random draws are found at run time (``capture._python_draws``: a generator whose state one call of
  the forward moves), not from the code's names: a NumPy ``Generator`` / ``RandomState`` / bit generator kept on
  the module, in a global, a list, a config object, a hook's closure or a default argument, and a module-level
  ``random.Random``, are refused naming it (before: captured, 8-11 of 30 calls differed from ``model(x)``), while a
  forward that draws only in training, calls ``np.sqrt``, or seeds its own generator in every call is captured and
  answers as eager on every one of 25 calls (before: refused on the names ``random`` / ``np``).
- A parameter, buffer or plain tensor attribute that forward returns as is comes back as the module's own tensor
  object (as eager returns it): edited in place through the output (``y["anchors"].mul_(2)``), every later call,
  local or split, returns the edited tensor as eager does (before: every later call refused as "changed in
  place"); replaced, it is still refused; one an op reads too, edited, is refused (the server holds its bytes).
"""

from __future__ import annotations

import random

import numpy as np
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


# ---- Python / NumPy random draws ---------------------------------------------------------------------------
GLOBAL_GEN = np.random.default_rng(1)
GLOBAL_RANDOM = random.Random(1)
GLOBAL_RS = np.random.RandomState(1)


class Flip(nn.Module):
    """Test-time augmentation: flips the input with probability 0.3, drawn by ``draw()`` (each subclass its own
    generator). Seeded so that the traced draw and the checked one both keep the input (session 18 captured it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def draw(self) -> float:
        raise NotImplementedError

    def forward(self, x):
        if self.draw() < 0.3:
            x = x.flip(-1)
        return self.fc(x)


class OnModule(Flip):
    def __init__(self, rng) -> None:
        super().__init__()
        self.rng = rng

    def draw(self):
        return self.rng.random()


class GlobalGenerator(Flip):
    def draw(self):
        return GLOBAL_GEN.random()


class GlobalRandom(Flip):
    def draw(self):
        return GLOBAL_RANDOM.random()


class GlobalRandomStateMethod(Flip):
    def draw(self):
        return GLOBAL_RS.random_sample()


class BitGen(Flip):
    def __init__(self) -> None:
        super().__init__()
        self.bits = np.random.PCG64(2)

    def draw(self):
        return (int(self.bits.random_raw()) % 1000) / 1000


class InList(Flip):
    def __init__(self) -> None:
        super().__init__()
        self.augs = [("flip", np.random.default_rng(1))]

    def draw(self):
        return self.augs[0][1].random()


class Cfg:
    def __init__(self) -> None:
        self.rng = np.random.default_rng(1)


class InConfig(Flip):
    def __init__(self) -> None:
        super().__init__()
        self.cfg = Cfg()

    def draw(self):
        return self.cfg.rng.random()


class DefaultArg(Flip):
    def draw(self, rng=np.random.default_rng(1)):  # noqa: B008 (a generator made once, as users write it)
        return rng.random()


class BoundMethod(Flip):
    def __init__(self) -> None:
        super().__init__()
        self.uniform = np.random.default_rng(1).random

    def draw(self):
        return self.uniform()


class Helper:
    def __init__(self) -> None:
        self.rng = np.random.default_rng(1)

    def draw(self) -> float:
        return self.rng.random()


class HelpersMethod(Flip):
    def __init__(self) -> None:
        super().__init__()
        self.sample = Helper().draw

    def draw(self):
        return self.sample()


def hooked():
    """A forward pre-hook that jitters the input by a factor drawn from a generator it closes over."""
    rng = np.random.default_rng(3)
    m = nn.Sequential(nn.Linear(8, 8)).eval()
    m.register_forward_pre_hook(lambda mod, args: (args[0] * float(rng.uniform(1.0, 1.0 + 1e-7)),))
    return m


DRAWS = {
    "generator_on_module": (lambda: OnModule(np.random.default_rng(1)), r"OnModule\.rng, a numpy\.random\.Generator"),
    "randomstate_on_module": (lambda: OnModule(np.random.RandomState(1)),
                              r"OnModule\.rng, a numpy\.random\.RandomState"),
    "global_generator": (GlobalGenerator, r"the global GLOBAL_GEN \(module [\w.]*test_user_models19\), a "
                                          r"numpy\.random\.Generator"),
    "global_random_instance": (GlobalRandom, r"the global GLOBAL_RANDOM \(module [\w.]*test_user_models19\), a "
                                             r"random\.Random"),
    "global_randomstate": (GlobalRandomStateMethod, r"the global GLOBAL_RS .*a numpy\.random\.RandomState"),
    "bit_generator": (BitGen, r"BitGen\.bits, a numpy\.random\.PCG64"),
    "in_a_list": (InList, r"InList\.augs\[0\]\[1\], a numpy\.random\.Generator"),
    "in_a_config_object": (InConfig, r"InConfig\.cfg\.rng, a numpy\.random\.Generator"),
    "default_argument": (DefaultArg, r"the default rng= of DefaultArg\.draw, a numpy\.random\.Generator"),
    "bound_method": (BoundMethod, r"BoundMethod\.uniform, a numpy\.random\.Generator"),
    "helpers_bound_method": (HelpersMethod, r"HelpersMethod\.sample\.__self__\.rng, a numpy\.random\.Generator"),
    "hook_closure": (hooked, r"rng in hooked\.<locals>\.<lambda>'s closure, a numpy\.random\.Generator"),
}
"""Forwards that draw from a Python-level generator on every call, each with the regex its refusal must match
(it names where the generator is)."""


@pytest.mark.parametrize("name", list(DRAWS))
def test_a_forward_drawing_from_a_python_generator_is_refused_naming_it(name):
    factory, where = DRAWS[name]
    torch.manual_seed(66)
    m = factory().eval()
    x = torch.randn(2, 8, generator=_g(67))
    with pytest.raises(InputError, match=rf"draws random numbers in Python \({where}\) in forward: the graph keeps "
                                         r"the value drawn while torch\.export traced it") as info:
        CoinferClient(m, (x,))
    assert "\n" not in str(info.value)


def test_the_refused_forwards_do_draw_anew_in_eager():
    """What the refusals protect: the same input gives other answers over 30 eager calls (the flip drawn anew)."""
    m = OnModule(np.random.default_rng(1)).eval()
    x = torch.randn(2, 8, generator=_g(68))
    first = _eager(m, (x,))
    assert any(not torch.equal(_eager(m, (x,)), first) for _ in range(30))


class Touchy:
    """A user object whose attributes raise on access (a lazy proxy, a closed handle)."""

    def __getattribute__(self, name):
        if name == "__class__":
            return Touchy
        raise RuntimeError(f"closed ({name})")


def test_an_attribute_that_raises_on_access_does_not_stop_the_capture():
    torch.manual_seed(78)
    m = SqrtScale().eval()
    m.handle = Touchy()
    x = torch.randn(2, 8, generator=_g(79))
    c = CoinferClient(m, (x,))
    assert_as_eager(c(x), _eager(m, (x,)), c.reference(x), "touchy")


class TrainOnlyNoise(nn.Module):
    """NumPy noise in training only (``/tmp/rv18p/p9``): eval never draws."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if self.training:
            x = x + torch.from_numpy(np.random.randn(*x.shape).astype("float32")) * 0.1
        return self.fc(x)


class SqrtScale(nn.Module):
    """``np.sqrt`` for a scale and a config flag named ``random`` (``p1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.random = False

    def forward(self, x):
        if self.random:
            x = x + 0.0
        return self.q(x) / np.sqrt(8)


class SeededPerCall(nn.Module):
    """A generator made and seeded in every call: the same draws every call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        k = random.Random(0).randint(1, 3)
        j = float(np.random.default_rng(5).uniform(1.0, 2.0))
        return self.fc(x) * k * j


class ReseededPerCall(nn.Module):
    """A generator kept on the module and seeded again at the start of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.rs = np.random.RandomState(7)

    def forward(self, x):
        self.rs.seed(0)
        return self.fc(x) * float(self.rs.uniform(1.0, 2.0))


DETERMINISTIC = {"train_only_noise": TrainOnlyNoise, "np_sqrt": SqrtScale, "seeded_per_call": SeededPerCall,
                 "reseeded_per_call": ReseededPerCall}


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_a_forward_whose_python_draws_repeat_each_call_answers_as_eager_every_call(name):
    """Before: refused on the names in its code ("draws random numbers in Python (numpy.random (via np))")."""
    torch.manual_seed(69)
    m = DETERMINISTIC[name]().eval()
    x = torch.randn(2, 8, generator=_g(70))
    c = CoinferClient(m, (x,))
    for i in range(25):
        xi = x if i % 2 == 0 else torch.randn(2, 8, generator=_g(71 + i))
        assert_as_eager(c(xi), _eager(m, (xi,)), c.reference(xi), (name, i))


def test_a_deterministic_python_draw_splits_as_eager(server):
    torch.manual_seed(72)
    _split_as_eager(server, SeededPerCall().eval(), (torch.randn(2, 8, generator=_g(73)),), calls=20)


# ---- a tensor forward returns as is, edited through the output ---------------------------------------------
class Anchors(nn.Module):
    """A detection head returning its anchors as is, kept as a buffer, a parameter or a plain tensor attribute;
    ``scaled``: an op reads them too."""

    def __init__(self, kind: str, scaled: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scaled = scaled
        a = torch.arange(12.0).reshape(4, 3).t()  # transposed: eager returns these strides
        if kind == "buffer":
            self.register_buffer("anchors", a)
        elif kind == "parameter":
            self.anchors = nn.Parameter(a)
        else:
            self.anchors = a

    def forward(self, x):
        y = self.fc(x)
        return {"cls": y * self.anchors.sum() if self.scaled else y, "anchors": self.anchors}


@pytest.mark.parametrize("kind", ["buffer", "parameter", "plain"])
def test_a_returned_tensor_edited_through_the_output_answers_as_eager(server, kind):
    """Eager: ``y["anchors"]`` is the module's tensor, so ``y["anchors"].mul_(2)`` edits it and the next
    ``model(x)`` returns the edited one. The client: the same object, and the same on every later call, full
    offload and local (before: every later call refused, "'anchors' was changed in place")."""
    torch.manual_seed(74)
    m = Anchors(kind).eval()
    x = torch.randn(2, 4, generator=_g(75))
    with CoinferClient(m, (x,), server=server.address, policy="offload", server_ops=0, link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        y = c(x)
        assert y["anchors"] is m.anchors is _eager(m, (x,))["anchors"]
        with torch.no_grad():
            y["anchors"].mul_(2)
        for j in range(3):
            got = c(x)
            assert c.last_report.server_ops > 0 and not c.last_report.fallback
            assert got["anchors"] is m.anchors
            assert_as_eager(got, _eager(m, (x,)), c.reference(x), (kind, j))
        assert m.anchors[0, 1].item() == 6.0  # 3.0 doubled, once
        local = CoinferClient(m, (x,))
        local(x)["anchors"].data.add_(1)
        assert_as_eager(local(x), _eager(m, (x,)), local.reference(x), kind)


@pytest.mark.parametrize("kind", ["buffer", "parameter", "plain"])
def test_a_returned_tensor_replaced_after_capture_is_still_refused(kind):
    m = Anchors(kind).eval()
    x = torch.randn(2, 4, generator=_g(76))
    c = CoinferClient(m, (x,))
    c(x)
    m.anchors = nn.Parameter(torch.ones(3, 4)) if kind == "parameter" else torch.ones(3, 4)
    with pytest.raises(InputError, match=r"'anchors' (\(read by the graph as a constant\) )?was replaced after the "
                                         r"client captured it"):
        c(x)


def test_a_returned_tensor_an_op_reads_too_edited_through_the_output_is_refused():
    """The server holds the bytes it was sent for an op: an edit through the output is a weight change."""
    m = Anchors("buffer", scaled=True).eval()
    x = torch.randn(2, 4, generator=_g(77))
    c = CoinferClient(m, (x,))
    c(x)["anchors"].mul_(2)
    with pytest.raises(InputError, match=r"'anchors' was changed in place after the client captured it"):
        c(x)
