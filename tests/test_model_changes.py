"""Ordinary changes a user makes to a model after building a ``CoinferClient`` (session 14's last attacker, issue
of session 15): each either gives ``model(x)`` exactly or is refused with an ``InputError`` naming what changed,
never a silently wrong answer; and ordinary edits that change nothing the forward computes are not refused.

Before session 15 (max|c(x) - model(x)|, offload / local / auto): a class attribute the forward reads changed on
the class 1.64 / 1.10 / 1.41; an ``nn.Linear`` kept in a plain (unregistered) list, its weight changed in place,
offload 1.04 (the server kept the uploaded copy); a forward hook replaced under the same key 0.36-0.57; a list
attribute of more than ``pystate.MAX_ITEMS`` items edited. ``model.name = "x"`` was refused.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.checks import warm_client
from ue_client import InputError
from ue_client.verify import max_abs_diff

POLICIES = ["local", "offload", pytest.param("auto", marks=pytest.mark.slow)]
"""``auto`` in the slow run only (``make test-all``): the change is found by the client's watch at the start of each
call and ``reference`` (``CoinferClient.__call__``: ``self._watch.check()`` before any engine), the same for every
policy; ``auto`` takes the local or the offload path, which the same tests run in the default suite."""
PY_POLICIES = ["local", pytest.param("offload", marks=pytest.mark.slow), pytest.param("auto", marks=pytest.mark.slow)]
"""For a change of Python state (a class or function attribute, a value read past the attributes, a hook's value, the
default dtype): ``local`` in the default run, ``offload`` and ``auto`` in the slow one. The watch that refuses it runs
before any engine, and under ``offload`` it is run in the default suite by
``test_a_tensor_of_an_unregistered_module_changed_is_refused[offload-*]`` (a server holding the uploaded copy)."""


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module.eval()


def _differs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The change changes the user's own answer (so an unrefused call would be a silently wrong one)."""
    with torch.inference_mode():
        assert max_abs_diff(y, module(x)) > 1e-3


def _same(c, module: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        assert max_abs_diff(c(x), module(x)) <= 1e-5


# ---- 1. class attributes ---------------------------------------------------------------------------------------

def _scaled_classes():
    class Base(nn.Module):
        scale = 1.0
        offset = (0.0, 0.0)
        unused = 7

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

    class Scaled(Base):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale + self.offset[0]

    return Base, Scaled


@pytest.mark.parametrize("how", ["class", "base_class", "subclass_shadows", "instance_shadows", "class_tuple"])
@pytest.mark.parametrize("policy", PY_POLICIES)
def test_a_class_attribute_the_forward_reads_changed_is_refused(server, policy: str, how: str) -> None:
    base, cls = _scaled_classes()
    module = _seeded(cls(), 3)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        cls.unused = 8  # a class attribute the forward does not read: no change
        _same(c, module, x)
        if how == "class":
            cls.scale = 2.0
        elif how == "base_class":
            base.scale = 2.0
        elif how == "subclass_shadows":
            cls.scale = 3.0  # set on the subclass, shadowing the base's
        elif how == "instance_shadows":
            module.scale = 2.0
        elif how == "class_tuple":
            base.offset = (1.0, 0.0)
        _differs(module, x, y)
        name = "offset" if how == "class_tuple" else "scale"
        with pytest.raises(InputError, match=name):
            c(x)
        with pytest.raises(InputError, match=name):
            c.reference(x)


# ---- 2. tensors of unregistered modules in plain containers ---------------------------------------------------

class Hidden(nn.Module):
    """Modules kept outside the module tree: in a plain list, a dict, and a plain attribute set around
    ``nn.Module.__setattr__`` (a teacher / EMA copy pattern). torch.export lifts their tensors as constants."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.heads = [nn.Linear(6, 6)]
        self.table = {"out": nn.Linear(6, 6)}
        object.__setattr__(self, "side", nn.Sequential(nn.Linear(6, 6), nn.Tanh()))
        for m in (self.heads[0], self.table["out"], self.side):
            _seeded(m, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table["out"](self.heads[0](self.fc(x))) + self.side(x)


def _change_hidden(module: Hidden, how: str) -> None:
    with torch.no_grad():
        if how == "list_weight_in_place":
            module.heads[0].weight.mul_(2.0)
        elif how == "dict_bias_in_place":
            module.table["out"].bias.add_(1.0)
        elif how == "attribute_weight_in_place":
            module.side[0].weight.mul_(-1.0)
        elif how == "list_module_replaced":
            module.heads[0] = _seeded(nn.Linear(6, 6), 12)
        elif how == "list_weight_replaced":
            module.heads[0].weight = nn.Parameter(torch.ones(6, 6))
        elif how == "load_state_dict":
            module.side.load_state_dict(_seeded(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), 13).state_dict())


@pytest.mark.parametrize("how", ["list_weight_in_place", "dict_bias_in_place", "attribute_weight_in_place",
                                 "list_module_replaced", "list_weight_replaced", "load_state_dict"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_tensor_of_an_unregistered_module_changed_is_refused(server, policy: str, how: str) -> None:
    module = _seeded(Hidden(), 4)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        _change_hidden(module, how)
        _differs(module, x, y)
        with pytest.raises(InputError, match="after the client captured"):
            c(x)


# ---- 3. hooks replaced under the same key -----------------------------------------------------------------------

class Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x))


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_a_hook_replaced_under_its_key_is_refused(server, policy: str, kind: str) -> None:
    module = _seeded(Hooked(), 5)
    if kind == "forward_hook":
        handle = module.fc.register_forward_hook(lambda m, i, o: o * 2.0)
    else:
        handle = module.out.register_forward_pre_hook(lambda m, i: (i[0] + 1.0,))
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        if kind == "forward_hook":
            module.fc._forward_hooks[handle.id] = lambda m, i, o: o * 3.0
        else:
            module.out._forward_pre_hooks[handle.id] = lambda m, i: (i[0] - 1.0,)
        _differs(module, x, y)
        with pytest.raises(InputError, match="hook"):
            c(x)


# ---- 4. large containers ---------------------------------------------------------------------------------------

class Long(nn.Module):
    """A forward reading a list of 200 numbers and a dict of 100 (over ``pystate.MAX_ITEMS``), beside 1000 class
    names it never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.weights = [1.0] * 200
        self.table = {i: float(i) for i in range(100)}
        self.class_names = [f"class {i}" for i in range(1000)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.weights[150] + self.table[99]


@pytest.mark.parametrize("how", ["list_item", "list_appended_then_item", "dict_item"])
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_a_large_container_edited_is_refused(server, policy: str, how: str) -> None:
    module = _seeded(Long(), 6)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        module.class_names[3] = "renamed"  # not read by the forward: no change
        module.class_names.append("one more")
        _same(c, module, x)
        if how == "list_item":
            module.weights[150] = 2.0
        elif how == "list_appended_then_item":
            module.weights.append(5.0)
            module.weights[150] = -1.0
        else:
            module.table[99] = 1.0
        _differs(module, x, y)
        with pytest.raises(InputError, match="table" if how == "dict_item" else "weights"):
            c(x)


# ---- 5. no false refusals ---------------------------------------------------------------------------------------

class Optional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) * getattr(self, "scale", 1.0)
        for k in getattr(self, "extra", ()):
            y = y * k
        return y + 1.0 if hasattr(self, "shift") else y


@pytest.mark.parametrize("missed", ["shift", "extra"])
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_metadata_added_after_building_is_not_refused(server, policy: str, missed: str) -> None:
    """A name, a string, a number or a tensor added under a name the forward never looked up changes nothing it
    computes: answered, equal to ``model(x)``; a value of any kind under a name it looked up and missed is
    refused."""
    module = _seeded(Optional(), 7)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        module.name = "my model"
        module.version = 3
        module.fc.note = "the classifier"
        module.calibration = torch.ones(2)
        _same(c, module, x)
        if missed == "shift":
            module.shift = 0.0  # looked up (hasattr) and missed at capture
        else:
            module.extra = [2.0]  # a list under a name looked up with a default
        _differs(module, x, y)
        with pytest.raises(InputError, match=missed):
            c(x)


@pytest.mark.parametrize("policy", ["local", "offload"])
def test_share_memory_is_not_refused(server, policy: str) -> None:
    """``module.share_memory()`` moves every parameter's and buffer's bytes to shared memory (another data pointer,
    the same storage object and values): answered, equal to ``model(x)``; a parameter's ``.data`` set to other
    bytes after it (the version counter does not move) is still refused."""
    module = _seeded(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 6)), 8)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        module.share_memory()
        assert module[0].weight.is_shared()
        _same(c, module, x)
        _same(c, module, x)
        module[2].weight.data = module[2].weight.data * 2.0
        _differs(module, x, y)
        with pytest.raises(InputError, match=r"'2\.weight' was changed"):
            c(x)


class _Offset(nn.Module):
    """Adds a plain tensor attribute (not a buffer): torch.export lifts it as a constant the graph reads."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.offset = torch.ones(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.offset


@pytest.mark.parametrize("policy", ["local", "offload"])
def test_a_plain_tensor_replaced_after_its_storage_moved_is_refused(server, policy: str) -> None:
    """``share_memory()`` on the module and ``share_memory_()`` on a plain tensor attribute the forward reads move
    their storage (new data pointers): answered. The tensor then replaced is refused: ``WeightWatch`` takes the
    graph's storage pointers again when storages move (``_baseline``: with the pointers of capture, the moved tensor
    was no longer one the graph reads, and its replacement was answered with the old values)."""
    module = _seeded(_Offset(), 9)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        module.share_memory()
        module.offset.share_memory_()
        _same(c, module, x)
        module.offset = torch.full((6,), 3.0)
        _differs(module, x, y)
        with pytest.raises(InputError, match="offset"):
            c(x)


def _class_table():
    class ClassTable(nn.Module):
        """Reads a class attribute (a list holding a tensor: lifted as a constant) under a name built at run time,
        which only the instance tracer sees (``_ClassReads``; no module attribute holds it: ``ConstantSources``
        does not find it)."""

        table = [torch.ones(6)]

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.key = "".join(["tab", "le"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + getattr(self, self.key)[0]

    return ClassTable


@pytest.mark.parametrize("policy", ["local", "offload"])
def test_a_class_tensor_replaced_after_its_storage_moved_is_refused(server, policy: str) -> None:
    """Pins ``WeightWatch._baseline``'s ``weight_reads(graph)`` after storages moved: the class attribute's tensor
    moved by ``share_memory_()`` is answered; replaced afterwards it is refused. With the storage pointers of capture
    kept (a mend tried in session 15), the moved tensor no longer counted as one the graph reads, so the old and
    the new list both projected to "a tensor the graph does not read" and the replacement was answered with the old
    values (this test failed)."""
    cls = _class_table()
    module = _seeded(cls(), 10)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        module.share_memory()
        cls.table[0].share_memory_()
        _same(c, module, x)
        cls.table[0] = torch.full((6,), 3.0)
        _differs(module, x, y)
        with pytest.raises(InputError, match="table"):
            c(x)


# ---- torch's default dtype changed after capture (final15) ---------------------------------------------------

class _Ramp(nn.Module):
    """Adds a ramp made in torch's default dtype: a factory op left to it (``torch.arange(0.5, 6.5)``), or
    integers times a Python float (``torch.arange(6) * 0.1``, ``x.argmax(-1, keepdim=True) * 0.5``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "factory":
            return self.fc(x) + torch.arange(0.5, 6.5) * 0.1
        if self.how == "int_times_float":
            return self.fc(x) + torch.arange(6) * 0.1
        if self.how == "tensor_literal":
            return self.fc(x) + torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
        return self.fc(x) + x.argmax(-1, keepdim=True) * 0.5


@pytest.mark.parametrize("how", ["factory", "int_times_float", "argmax_times_float", "tensor_literal"])
@pytest.mark.parametrize("policy", PY_POLICIES)
def test_a_default_dtype_changed_after_capture_is_refused_where_the_forward_makes_tensors_in_it(
        server, policy: str, how: str) -> None:
    """Before: after ``torch.set_default_dtype(torch.float64)`` eager answered float64 and every path the captured
    float32 (the graph pins the factory op's dtype); now refused, and answered again once the default is back. A
    model whose forward makes no float tensor in the default dtype is answered under either default."""
    module = _seeded(_Ramp(how), 3)
    plain = _seeded(nn.Sequential(nn.Linear(6, 6), nn.ReLU()), 4)
    owned = _seeded(_Offset(), 4)  # reads its own float32 tensor attribute (a lifted constant it did not make)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, _), warm_client(server, plain, x, policy) as (c2, _), \
            warm_client(server, owned, x, policy) as (c3, _):
        try:
            torch.set_default_dtype(torch.float64)
            with torch.inference_mode():
                assert module(x).dtype == torch.float64  # the user's own answer changed dtype
            with pytest.raises(InputError, match="default dtype"):
                c(x)
            _same(c2, plain, x)  # arange-free: float32 in eager too
            _same(c3, owned, x)
        finally:
            torch.set_default_dtype(torch.float32)
        _same(c, module, x)


# ---- objects the forward read that no snapshot watches (final15) ----------------------------------------------

class _Act(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = functools.partial(F.leaky_relu, negative_slope=0.1)
        self.post = lambda t: t * 2.0
        self.unused = functools.partial(F.gelu, approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.act(self.fc(x) - 1.0))


@pytest.mark.parametrize("how", ["partial", "lambda", "deleted"])
@pytest.mark.parametrize("policy", PY_POLICIES)
def test_a_function_attribute_the_forward_reads_replaced_is_refused(server, policy: str, how: str) -> None:
    """Before: a ``functools.partial`` or a lambda the forward calls, replaced on the instance, was answered with
    the captured one on every path (1.5-2.3 off ``model(x)``); one the forward never reads is let be."""
    module = _seeded(_Act(), 5)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        module.unused = functools.partial(F.gelu)  # not read by the forward: no change
        _same(c, module, x)
        if how == "partial":
            module.act = functools.partial(F.leaky_relu, negative_slope=0.9)
        elif how == "lambda":
            module.post = lambda t: t * 3.0
        else:
            del module.post
            module.post = lambda t: t * 2.0  # an equal lambda, another object: the rule is by object
        if how != "deleted":
            _differs(module, x, y)
        with pytest.raises(InputError, match=r"post|act"):
            c(x)


# ---- attributes a forward sets before it reads them: per-call scratch (final15) --------------------------------

class _Pyramid(nn.Module):
    """RAFT's ``CorrBlock`` pattern: the forward builds a list of tensors from its input, stores it on ``self`` and
    reads it back (torchvision's ``raft_small`` was refused at capture: "changes the Python attribute
    corr_block.corr_pyramid"); also a helper object and a count set the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.pyramid = [torch.zeros(1)]
        self.helper = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pyramid = [x]
        for _ in range(3):
            self.pyramid.append(self.pyramid[-1][:, ::2])
        self.helper = functools.partial(torch.add, alpha=0.5)
        self.levels = len(self.pyramid)
        y = self.fc(x)
        return y + sum(p.sum(-1, keepdim=True) for p in self.pyramid) * self.levels + self.helper(y, y)


class _History(nn.Module):
    """Reads a list before it replaces it: the graph is specialised on its length (refused at capture)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.hist: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.hist)
        self.hist = [*self.hist, 0]
        return self.fc(x) * (n + 1)


@pytest.mark.parametrize("policy", POLICIES)
def test_attributes_the_forward_sets_before_reading_are_scratch_not_state(server, policy: str) -> None:
    module = _seeded(_Pyramid(), 7)
    x = torch.randn(3, 8)
    with warm_client(server, module, x, policy) as (c, _):
        for seed in (1, 2):
            x2 = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
            with torch.inference_mode():
                module(x2)  # the user's own call rebuilds the scratch
            _same(c, module, x2)


def test_an_attribute_the_forward_reads_before_replacing_it_is_still_refused_at_capture() -> None:
    from modelgraph.capture import capture
    from modelgraph.errors import CaptureError

    with pytest.raises(CaptureError, match="hist"):
        capture(_seeded(_History(), 1), (torch.randn(3, 8),))


# ---- what the forward reads past its modules' attributes (session 16) -----------------------------------------
# Before session 16 each change below was answered with the captured graph on every path (silent_probe.py of
# docs/results/attack/session15_final15: 1.1-14 off ``model(x)``).

SCALE = 1.0
"""A module global the forward of ``_Reader("global")`` reads (rebound by the test)."""
TABLE = [1.0, 2.0]


class _PlainCfg:
    def __init__(self) -> None:
        self.scale = 1.0
        self.comment = "not read by forward"
        self.sub = types.SimpleNamespace(shift=0.0)


class _SlotCfg:
    __slots__ = ("scale", "unused")

    def __init__(self) -> None:
        self.scale, self.unused = 1.0, 0


class _Desc:
    def __init__(self) -> None:
        self.v = 1.0

    def __get__(self, obj: object, typ: type | None = None) -> float:
        return self.v


_CFG = _PlainCfg()


class _Reader(nn.Module):
    """Reads a value past its own attributes, by ``how``."""

    k = 1.0
    d = _Desc()

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.how = how
        self.cfg = _PlainCfg()
        self.slot = _SlotCfg()
        object.__setattr__(self, "aux", nn.ReLU())  # kept outside the module tree
        self.acts = [nn.LeakyReLU(0.1)]  # a module in a plain list: outside the tree too

    @property
    def prop(self) -> float:
        return _CFG.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.how == "type_self":
            return y * type(self).k
        if self.how == "dunder_class":
            return y * self.__class__.k
        if self.how == "plain_field":
            return y * self.cfg.scale + self.cfg.sub.shift
        if self.how == "slots_field":
            return y * self.slot.scale
        if self.how == "property":
            return y * self.prop
        if self.how == "descriptor":
            return y * self.d
        if self.how == "global":
            return y * SCALE + TABLE[0]
        if self.how == "outside_attr":
            return self.aux(y - 0.5)
        return self.acts[0](y - 0.5)  # outside_list


def _change_reader(module: _Reader, how: str, undo: list) -> None:
    g = globals()
    if how in ("type_self", "dunder_class"):
        undo.append(lambda: setattr(_Reader, "k", 1.0))
        _Reader.k = 2.0
    elif how == "plain_field":
        module.cfg.scale = 3.0
    elif how == "plain_nested":
        module.cfg.sub.shift = 1.0
    elif how == "slots_field":
        module.slot.scale = 3.0
    elif how == "property":
        undo.append(lambda: setattr(_CFG, "scale", 1.0))
        _CFG.scale = 3.0
    elif how == "descriptor":
        undo.append(lambda: setattr(vars(_Reader)["d"], "v", 1.0))
        vars(_Reader)["d"].v = 4.0
    elif how == "global":
        undo.append(lambda: g.update(SCALE=1.0))
        g["SCALE"] = 2.0
    elif how == "global_list":
        undo.append(lambda: TABLE.__setitem__(0, 1.0))
        TABLE[0] = 5.0
    elif how == "outside_attr":
        module.aux.register_forward_hook(lambda mod, i, o: o * 7.0)
    elif how == "outside_pre_hook":
        module.aux.register_forward_pre_hook(lambda mod, i: (i[0] + 1.0,))
    elif how == "outside_list":
        module.acts[0].negative_slope = 0.9
    elif how == "outside_list_hook":
        module.acts[0].register_forward_hook(lambda mod, i, o: o * 3.0)


_READER_FORWARD = {"plain_nested": "plain_field", "global_list": "global", "outside_pre_hook": "outside_attr",
                   "outside_list_hook": "outside_list"}
_READER_NAME = {"type_self": "k", "dunder_class": "k", "plain_field": "scale", "plain_nested": "shift",
                "slots_field": "scale", "property": "scale", "descriptor": "v", "global": "SCALE",
                "global_list": "TABLE", "outside_attr": "aux", "outside_pre_hook": "aux", "outside_list": "acts",
                "outside_list_hook": "acts"}


@pytest.mark.parametrize("how", list(_READER_NAME))
@pytest.mark.parametrize("policy", PY_POLICIES)
def test_a_value_the_forward_reads_past_its_attributes_changed_is_refused(server, policy: str, how: str) -> None:
    """Class attributes read as ``type(self).k`` / ``self.__class__.k``, a plain object's field (``__dict__``,
    nested, ``__slots__``), a property or descriptor reading other state, module globals, and modules called
    outside the module tree (a hook added, an attribute changed): refused naming it, on every path."""
    module = _seeded(_Reader(_READER_FORWARD.get(how, how)), 21)
    x = torch.randn(3, 6)
    undo: list = []
    try:
        with warm_client(server, module, x, policy) as (c, y):
            module.cfg.comment = "edited"  # a field the forward's code never names: no change
            _same(c, module, x)
            _change_reader(module, how, undo)
            _differs(module, x, y)
            with pytest.raises(InputError, match=_READER_NAME[how]):
                c(x)
    finally:
        for f in undo:
            f()


def _hooked(how: str):
    """A module whose forward hook reads a value by ``how``; returns (module, change)."""
    m = nn.Sequential(nn.Linear(6, 6))
    box = [1.0]
    scale = 1.0

    if how == "closure_list":
        m.register_forward_hook(lambda mod, i, o: o * box[0])
        return m, lambda: box.__setitem__(0, 2.0)
    if how == "closure_rebound":
        def hook(mod, i, o):
            return o * scale

        def change():
            nonlocal scale
            scale = 2.0
        m.register_forward_hook(hook)
        return m, change
    if how == "partial_kwarg":
        def scaled(mod, i, o, *, by):
            return o * by[0]
        m.register_forward_hook(functools.partial(scaled, by=box))
        return m, lambda: box.__setitem__(0, 2.0)
    if how == "bound_method":
        obj = _PlainCfg()

        class Hook:
            def __init__(self, cfg) -> None:
                self.cfg = cfg

            def run(self, mod, i, o):
                return o * self.cfg.scale
        m.register_forward_hook(Hook(obj).run)
        return m, lambda: setattr(obj, "scale", 2.0)
    if how == "default_arg":
        def hook_d(mod, i, o, k=box):
            return o * k[0]
        m.register_forward_hook(hook_d)
        return m, lambda: box.__setitem__(0, 2.0)
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["closure_list", "closure_rebound", "partial_kwarg", "bound_method", "default_arg"])
@pytest.mark.parametrize("policy", PY_POLICIES)
def test_a_value_a_hook_reads_changed_is_refused(server, policy: str, how: str) -> None:
    """Values a forward hook reads through its closure, a ``functools.partial``'s keywords, its bound object's
    fields or its defaults."""
    module, change = _hooked(how)
    module = _seeded(module, 22)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        change()
        _differs(module, x, y)
        with pytest.raises(InputError, match="changed"):
            c(x)


@dataclasses.dataclass
class _HfConfig:
    hidden_size: int = 6
    layer_norm_eps: float = 1e-5
    scale: float = 1.0
    name_or_path: str = "tiny"


class _PlainHfConfig:
    """A ``PretrainedConfig``-like plain object (many fields, few read)."""

    def __init__(self) -> None:
        self.hidden_size, self.layer_norm_eps, self.scale = 6, 1e-5, 1.0
        self.name_or_path, self.id2label = "tiny", {0: "a", 1: "b"}
        self.output_attentions = False


class _HfBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dense(x)) * self.config.scale
        return h.view(-1, self.config.hidden_size)


@pytest.mark.parametrize("config", ["dataclass", "plain"])
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_hf_style_config_fields_read_in_forward(server, policy: str, config: str) -> None:
    """HF-style modules read ``self.config.<field>`` in forward: answered; a field the forward does not read edited
    (``name_or_path``, ``id2label``), a global it does not read, a class attribute it does not read: answered; the
    field it reads changed: refused."""
    cfg = _HfConfig() if config == "dataclass" else _PlainHfConfig()
    module = _seeded(_HfBlock(cfg), 23)
    x = torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        if config == "plain":
            cfg.name_or_path = "renamed"
            cfg.id2label[2] = "c"
            cfg.output_attentions = True
            _same(c, module, x)
        cfg.scale = 2.0
        _differs(module, x, y)
        with pytest.raises(InputError, match="scale"):
            c(x)


def test_an_equal_number_rebound_is_not_refused(server) -> None:
    """A global rebound to an equal value (a config file re-read) is no change."""
    module = _seeded(_Reader("global"), 24)
    x = torch.randn(3, 6)
    g = globals()
    with warm_client(server, module, x, "local") as (c, _):
        g["SCALE"] = float("1.0")  # another float object, the same value
        _same(c, module, x)


@pytest.mark.parametrize("when", ["cold", "after_fallback"])
def test_a_global_changed_is_refused_cold_and_after_a_fallback(server, when: str) -> None:
    """The check runs before any path is chosen: a change before the first request (cold) and one after the server
    went away (the client fell back to its local graph) are refused alike; set back, the client answers again."""
    from edge_server.testing import ServerThread
    from tests.checks import FAST_LINK
    from ue_client import CoinferClient, new_tenant

    module = _seeded(_Reader("global"), 25)
    x = torch.randn(3, 6)
    g = globals()
    srv = server if when == "cold" else ServerThread(threads=1).start()
    c = CoinferClient(module, (x,), server=srv.address, policy="offload", link=FAST_LINK, tenant=new_tenant(),
                      profile_runs=2, probe=False, timeout_ms=20_000)
    try:
        if when == "after_fallback":
            _same(c, module, x)
            assert not c.last_report.fallback and c.last_report.server_ops > 0
            srv.stop()
            _same(c, module, x)
            assert c.last_report.fallback
        with torch.inference_mode():
            y0 = module(x)
        g["SCALE"] = 2.0
        _differs(module, x, y0)
        with pytest.raises(InputError, match="SCALE"):
            c(x)
        g["SCALE"] = 1.0
        _same(c, module, x)
    finally:
        g["SCALE"] = 1.0
        c.close()
        if when == "after_fallback":
            srv.stop()


class _Gru(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(self.emb(ids))
        return self.out(y)


@pytest.mark.parametrize("policy", ["local", "offload"])
def test_an_rnn_captured_again_is_not_refused(server, policy: str) -> None:
    """An RNN rebuilds its ``_flat_weight_refs`` (a new list of weak references to the same parameters) whenever a
    capture swaps its weights: a second client of the module, or a new input signature captured from it, made the
    first client refuse every later call ("_flat_weight_refs changed", newuser16's
    ``docs/results/userzoo/session16/rnn_false_refusal.py``). The weak references are compared by their targets now;
    a weight changed in place is still refused."""
    from tests.checks import FAST_LINK
    from ue_client import CoinferClient, new_tenant

    module = _seeded(_Gru(), 26)
    a, b = torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (4, 9))
    with CoinferClient(module, (a,), server=server.address, policy=policy, link=FAST_LINK, tenant=new_tenant(),
                       profile_runs=2, fallback=False) as c:
        _same(c, module, a)
        _same(c, module, b)  # another signature: captured from the same module
        CoinferClient(module, (a,)).close()  # a second client captures it again
        _same(c, module, a)
        with torch.no_grad():
            module.gru.weight_hh_l0.mul_(2.0)
        with pytest.raises(InputError, match="weight_hh_l0"):
            c(a)


def test_a_capture_under_a_profiler_is_not_broken() -> None:
    """Under cProfile (``sys.setprofile`` holds a profiler object, not a function) the capture leaves the profiler
    alone: the model is captured (before: TypeError "'Profile' object is not callable"), the profiler still runs
    after, and what the profile function would have seen past the modules is not watched."""
    import cProfile
    import sys

    from modelgraph.capture import capture

    prof = cProfile.Profile()
    prof.enable()
    try:
        graph = capture(_seeded(_Reader("global"), 27), (torch.randn(3, 6),))
        assert sys.getprofile() is prof
    finally:
        prof.disable()
    assert graph.python_reads is not None and not graph.python_reads.called
