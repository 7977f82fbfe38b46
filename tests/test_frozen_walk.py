"""``modelgraph.pystate._frozen_rngs``: the generators ``gc.freeze()`` hid are found behind Python objects, and the
walk never calls an extension object's own traversal (session 29: on a GPU machine's Python 3.12 the walk over every
frozen object's referents segfaulted a client's construction)."""

from __future__ import annotations

import abc
import collections
import gc
import random
import types

import numpy as np
import pytest
import torch

from modelgraph.pystate import _python_class, live_rngs


class Base(abc.ABC):  # noqa: B024  (an ABC for its metaclass, abc.ABCMeta)
    rng = None


class Failure(Exception):
    pass


class Slotted:
    __slots__ = ("rng",)


Pair = collections.namedtuple("Pair", "a rng")


def _holders():
    """(where, holder, id of the generator): each generator reachable only through its holder."""
    out = []

    class FromAbc(Base):
        pass

    FromAbc.rng = np.random.default_rng(1)
    out.append(("ABC class attribute", FromAbc, id(FromAbc.rng)))
    e = Failure("x")
    e.rng = random.Random(2)
    out.append(("exception attribute", e, id(e.rng)))
    s = Slotted()
    s.rng = np.random.default_rng(3)
    out.append(("__slots__ object", s, id(s.rng)))
    p = Pair(0, random.Random(4))
    out.append(("namedtuple field", p, id(p.rng)))

    def closure():
        r = random.Random(5)
        return (lambda: r), id(r)

    f, i = closure()
    out.append(("closure cell", f, i))
    d = collections.deque([np.random.default_rng(6)])
    out.append(("deque", d, id(d[0])))
    ns = types.SimpleNamespace(rng=random.Random(7))
    out.append(("SimpleNamespace", ns, id(ns.rng)))
    m = torch.nn.Linear(2, 2)
    m.rng = np.random.default_rng(8)
    out.append(("nn.Module attribute", m, id(m.rng)))
    return out


def test_frozen_generators_behind_python_objects_are_found():
    holders = _holders()
    gc.collect()
    gc.freeze()
    try:
        assert gc.get_freeze_count() > 0
        found = {id(g) for g in live_rngs()}
        missing = [w for w, _, i in holders if i not in found]
        assert not missing, missing
    finally:
        gc.unfreeze()


@pytest.mark.parametrize(("t", "walked"), [
    (torch.nn.Module, True), (Base, True), (Failure, True), (Slotted, True), (Pair, True), (dict, True),
    (torch.Tensor, False), (torch.nn.Parameter, False), (np.ndarray, False), (np.random.Generator, False),
    (type("FromTensor", (torch.Tensor,), {}), False),
])
def test_only_python_objects_are_walked_into(t, walked):
    assert _python_class(t, {}) is walked


def test_classes_of_python_metaclasses_are_walked_into():
    cache: dict = {}
    assert _python_class(abc.ABCMeta, cache, metaclass=True) and _python_class(type, cache, metaclass=True)
    import grpc._cython.cygrpc as cygrpc

    compiled = next(t for t in vars(cygrpc).values() if isinstance(t, type) and t.__module__.startswith("grpc"))
    assert not _python_class(compiled, cache)
