"""``modelgraph.pystate._frozen_rngs``: the generators ``gc.freeze()`` hid are found behind Python objects, and the
walk never calls an extension object's own traversal (session 29: on a GPU machine's Python 3.12 the walk over every
frozen object's referents segfaulted a client's construction)."""

from __future__ import annotations

import abc
import collections
import contextvars
import gc
import itertools
import random
import threading
import types

import numpy as np
import pytest
import torch

from modelgraph.pystate import _cpython_traversal, live_rngs


class Base(abc.ABC):  # noqa: B024  (an ABC for its metaclass, abc.ABCMeta)
    rng = None


class Failure(Exception):
    pass


class Slotted:
    __slots__ = ("rng",)


Pair = collections.namedtuple("Pair", "a rng")


class Ordered(collections.OrderedDict):
    pass


class Queue(collections.deque):
    pass


class Array(np.ndarray):
    pass


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
    # (review29: lost by the walk's first session-29 rule, found before it; CPython's C types and attribute dicts)
    o = Ordered(a=np.random.default_rng(9))
    out.append(("OrderedDict subclass", o, id(o["a"])))
    q = Queue([np.random.default_rng(10)])
    out.append(("deque subclass", q, id(q[0])))
    g = np.random.default_rng(11)
    out.append(("itertools.cycle", itertools.cycle([g]), id(g)))
    tl = threading.local()
    tl.rng = np.random.default_rng(12)
    out.append(("threading.local", tl, id(tl.rng)))
    g = np.random.default_rng(13)
    out.append(("ContextVar default", contextvars.ContextVar("rng", default=g), id(g)))
    t = torch.zeros(1)
    t.rng = np.random.default_rng(14)
    out.append(("tensor attribute", t, id(t.rng)))
    a = np.zeros(2).view(Array)
    a.rng = np.random.default_rng(15)
    out.append(("ndarray subclass attribute", a, id(a.rng)))
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
    (torch.nn.Module, True), (Base, True), (abc.ABCMeta, True), (Failure, True), (Slotted, True), (Pair, True),
    (dict, True), (Ordered, True), (Queue, True), (itertools.cycle, True), (threading.local, True), (type, True),
    (torch.Tensor, False), (torch.nn.Parameter, False), (np.ndarray, True), (Array, True),
    (np.random.Generator, False), (type(np.random.default_rng), False),
    (type("FromTensor", (torch.Tensor,), {}), False),
])
def test_only_objects_whose_traversal_is_cpythons_are_walked_into(t, walked):
    """(review29: a Cython function's type has a ``__dict__`` and a ``__weakref__`` and was taken for a Python
    class by the first rule; ``type(np.random.default_rng)`` is one.) An ndarray has no traversal at all (not a
    collected type), so a Python subclass's is CPython's alone (its ``__dict__``)."""
    assert _cpython_traversal(t, {}) is walked


def test_compiled_types_of_grpc_are_not_walked_into():
    import grpc._cython.cygrpc as cygrpc

    from modelgraph.pystate import _READ_TRAVERSE, _SUBTYPE_TRAVERSE

    if _READ_TRAVERSE is None:
        pytest.skip("this interpreter's type layout is not read (the fallback rule applies)")
    traversed = [t for t in vars(cygrpc).values()  # compiled (Cython) traversals, not plain classes of the .pyx
                 if isinstance(t, type) and t.__module__.startswith("grpc")
                 and _READ_TRAVERSE(t) not in (0, _SUBTYPE_TRAVERSE)]
    assert traversed and not any(_cpython_traversal(t, {}) for t in traversed)
