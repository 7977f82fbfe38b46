"""The Python state of a user's module that its captured graph is specialised on.

``torch.export`` records the values a forward read from plain Python attributes (a call counter, a
temperature, a config dict) and from plain tensor attributes (lifted as constants). When a forward changes
such state (``self.n += 1``, ``self._calls += 1``, ``self.cfg["t"] *= 2``, ``self.scale = self.scale * 2``),
or the user changes it between calls (``model.temperature = 3.0``), the graph keeps the captured value
while ``model(*inputs)`` moves on: a silently wrong answer on every path. ``PythonState`` snapshots that
state; ``changed`` names the first attribute that differs. Session 12 checked public plain scalars only;
session 13 (attack13) found private ones, dicts/lists of scalars and replaced tensor attributes silently
wrong, and changes between calls never checked.

What is watched, per submodule: every attribute in its ``__dict__`` except ``torch.nn.Module``'s own
bookkeeping (``_parameters``, ``_modules``, hooks, ...; ``training`` is watched): plain scalars (bool, int, float,
complex, str, None), lists / tuples / dicts / sets of them (nested at most ``MAX_DEPTH`` deep, at most
``MAX_ITEMS`` items in all), and plain tensor attributes (identity and version counter; only those the
graph reads count, ``changed(reads=...)``), also inside containers and in the fields of plain configuration
objects (``SimpleNamespace``, ``argparse.Namespace``, dataclass instances: session 14 found a constant replaced
in a list or dict, and a config field changed, silently wrong). Other objects (functions, arbitrary classes)
are not watched. The module tree itself is (``_Structure``: children, hooks, ``forward`` on the instance or
the class, and numbers, strings, tensors, parameters and buffers added to a submodule after capture)."""

from __future__ import annotations

import _random
import abc
import argparse
import array
import builtins
import collections
import contextlib
import copy
import dataclasses
import datetime
import dis
import functools
import gc
import inspect
import io
import itertools
import linecache
import logging
import math
import operator
import os
import pickle
import random
import secrets
import sys
import sysconfig
import threading
import time
import types
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

SCALARS = (bool, int, float, complex, str, type(None))
MAX_DEPTH = 3
MAX_ITEMS = 64
MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks_with_kwargs")
"""A module's hook tables whose entries run in forward, and the flags (with kwargs, always called) that say how."""
_GLOBAL_HOOK_TABLES = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
                       "_global_forward_hooks_always_called")
"""``torch.nn.Module``'s own bookkeeping (hooks, parameter tables): never user state. ``training`` is
watched: the graph is captured in eval mode (``capture`` switches the module), so a module switched back
to training mode (``module.train()``: dropout on, batch-norm on batch statistics) no longer computes what
the graph does."""
_UNWATCHED = object()
_MISSING = "<unset>"


class _TensorMark:
    """A plain tensor attribute: the object and its version counter."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor, self.version = t, (-1 if t.is_inference() else t._version)  # inference tensors keep none

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TensorMark) and other.tensor is self.tensor and other.version == self.version

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"tensor{tuple(self.tensor.shape)} (version {self.version})"


_ANY = "<a tensor the graph does not read>"


def _config_like(v: Any) -> bool:
    """A plain configuration object whose fields a forward may read: ``types.SimpleNamespace``,
    ``argparse.Namespace`` or a dataclass instance (other objects are not watched)."""
    return isinstance(v, types.SimpleNamespace | argparse.Namespace) or (
        dataclasses.is_dataclass(v) and not isinstance(v, type))


def _snap(v: Any, depth: int, budget: list[int]) -> Any:
    if isinstance(v, SCALARS):
        return ("nan",) if isinstance(v, float) and math.isnan(v) else v
    if isinstance(v, torch.Tensor):
        return _TensorMark(v)
    if isinstance(v, weakref.ref):  # RNNs' ``_flat_weight_refs``: rebuilt (a new list) whenever a capture swaps weights
        t = v()
        return _TensorMark(t) if isinstance(t, torch.Tensor) else _UNWATCHED
    if depth < MAX_DEPTH and _config_like(v) and isinstance(getattr(v, "__dict__", None), dict):
        fields = vars(v)
        budget[0] -= len(fields)
        if budget[0] < 0:
            return _UNWATCHED
        snaps = ((k, _snap(x, depth + 1, budget)) for k, x in fields.items())
        return (type(v), tuple((k, x) for k, x in snaps if x is not _UNWATCHED))  # fields of other kinds: skipped
    if isinstance(v, bytearray | array.array | memoryview):  # review21: watched by identity only, 4/20 calls wrong
        return _buffer_snap(v, budget)
    if depth < MAX_DEPTH and isinstance(v, collections.deque):  # (a rotated deque: 16/20 calls wrong, review21)
        budget[0] -= len(v)
        items = [_snap(x, depth + 1, budget) for x in v] if budget[0] >= 0 else [_UNWATCHED]
        return _UNWATCHED if any(s is _UNWATCHED for s in items) else (collections.deque, tuple(items))
    if depth >= MAX_DEPTH or not isinstance(v, list | tuple | dict | set | frozenset):
        return _UNWATCHED
    budget[0] -= len(v)
    if budget[0] < 0:
        return _UNWATCHED
    if isinstance(v, dict):
        items = []
        for k, x in v.items():
            s = _snap(x, depth + 1, budget)
            if not isinstance(k, SCALARS) or s is _UNWATCHED:
                return _UNWATCHED
            items.append((k, s))
        return (dict, tuple(items))
    if isinstance(v, set | frozenset):
        return (set, frozenset(v)) if all(isinstance(x, SCALARS) for x in v) else _UNWATCHED
    items = [_snap(x, depth + 1, budget) for x in v]
    return _UNWATCHED if any(s is _UNWATCHED for s in items) else (type(v), tuple(items))


class _BufferSnap(tuple):
    """The snapshot of a ``bytearray``, an ``array.array`` or a ``memoryview``: (kind, format, bytes)."""

    __slots__ = ()

    def __repr__(self) -> str:
        kind, fmt, data = self
        return f"<a {kind} ({fmt}) of {len(data)} bytes: {data[:16].hex()}{'...' if len(data) > 16 else ''}>"


def _buffer_snap(v: bytearray | array.array | memoryview, budget: list[int]) -> Any:
    """``_BufferSnap`` of a buffer (its bytes; ``budget`` counts 8-byte words), ``_UNWATCHED`` past the budget or
    for a released memoryview."""
    try:
        nbytes = v.nbytes if isinstance(v, memoryview) else len(v) * (v.itemsize if isinstance(v, array.array) else 1)
        budget[0] -= (nbytes + 7) // 8
        if budget[0] < 0:
            return _UNWATCHED
        fmt = v.format if isinstance(v, memoryview) else v.typecode if isinstance(v, array.array) else "B"
        return _BufferSnap((type(v).__name__, fmt, v.tobytes() if not isinstance(v, bytearray) else bytes(v)))
    except ValueError:  # a released memoryview
        return _UNWATCHED


def _immutable(v: Any) -> bool:
    """A scalar, or a tuple of immutables (what identity alone says is unchanged)."""
    return isinstance(v, SCALARS) or (type(v) is tuple and all(_immutable(x) for x in v))


def snapshot(v: Any, budget: int = MAX_ITEMS) -> Any:
    """A comparable copy of an attribute's value (``_UNWATCHED`` for what is not watched: past ``budget``
    items in all, nested deeper than ``MAX_DEPTH``, objects of other kinds)."""
    return _snap(v, 0, [budget])


MAX_READ_ITEMS = 100_000
"""Items watched, at most, in an attribute the forward read at capture (``ForwardReads.instance``): past
``MAX_ITEMS`` such an attribute was not watched (session 14's last attacker edited a list of 65 numbers the
forward read: a silently wrong answer). Its snapshot is compared on every call, so this is also what such a
check costs (~0.3 us per item)."""


@dataclasses.dataclass(frozen=True)
class ForwardReads:
    """The names a forward looked up on each submodule (by its path in ``named_modules``) while it ran at
    capture (``traced_reads``), sorted by where each was found then.

    ``instance``: in the submodule's ``__dict__`` (plain attributes; watched by ``PythonState`` whatever their
    size). ``classes``: on its class, below ``torch.nn.Module`` (``class M: scale = 1.0`` read as
    ``self.scale``; methods and properties too): ``PythonState`` watches each in the class dicts of the
    submodule's method resolution order, so a class attribute changed after capture (on the class, a base class,
    or shadowed by a subclass or the instance) is refused. ``missed``: looked up and not found
    (``getattr(self, "scale", 1.0)``, ``hasattr``): an attribute added later under such a name is refused,
    one under a name never looked up (``model.name = "x"``) is not. ``untraced``: submodules whose class
    defines its own ``__getattribute__`` (not seen: the conservative rules apply to them). Reads that do not go
    through the instance (``type(self).scale``, ``M.scale``, ``self.__dict__[...]``, a module global) are not
    seen.

    ``scratch``: attributes the forward set on the submodule (``nn.Module.__setattr__``) before it looked them up
    (RAFT's ``corr_block.corr_pyramid``, rebuilt from the inputs on every call): what they held before the call
    is nothing the forward computes from, so they are neither a change at capture nor watched after (final15:
    torchvision's ``raft_small`` was refused at capture)."""

    instance: Mapping[str, frozenset[str]]
    classes: Mapping[str, frozenset[str]]
    missed: Mapping[str, frozenset[str]]
    untraced: frozenset[str]
    scratch: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    outside: tuple[tuple[str, torch.nn.Module], ...] = ()
    """Modules the forward called that are not in the module tree (``object.__setattr__(self, "aux", nn.ReLU())``,
    a module in a plain list, a global one), with their submodules, each named by where it was found (session 16:
    a hook registered on one after capture was answered with the captured graph, 1.1-14 off ``model(x)``): watched
    as the tree's submodules are (hooks, children, class, attributes; ``PythonState``)."""
    names: frozenset[str] = frozenset()
    """The attribute and global names (``co_names``) and the string constants of the user code the forward ran
    (every Python function it called outside torch, the standard library and ``modelgraph``): the fields of a
    plain object, a class or a module global that the forward may have read (``self.cfg.scale``,
    ``type(self).k``, ``SCALE``) are among them; ``_Reached`` watches those fields only."""
    globals: tuple[tuple[dict, str], ...] = ()
    """(a function's ``__globals__``, name) of each module global the user code the forward ran loaded
    (``LOAD_GLOBAL``; builtins and modules left out)."""
    written: frozenset[tuple[int, Any]] = frozenset()
    """(id of the container, key) of the places past the modules' attributes that the forward itself only adds to
    on every call (a hook appending each output's shape to a list it closes over; ``_grew``), and the bookkeeping of
    packages torch requires and ``itertools.count``s it moves: capture runs the forward once more and compares
    (``_Reached.moves``); such places are per-call scratch, not watched. Any other place that call moves is refused
    (``capture._forward_writes``; before session 21 every moved place was scratch: review21)."""
    draws: tuple[tuple[str, Any], ...] = ()
    env_keys: frozenset[str] = frozenset()
    """The environment variables the forward looked up as it ran (``os.environ``'s ``__getitem__``, under
    ``os.environ.get``, ``os.getenv``, ``"X" in os.environ``, whatever name the mapping was reached by and however
    the key was made: ``os.environ.get(self.var)``, ``from os import environ as E``); watched with those the code
    names (``_Reached``)."""
    """(where it was found, generator) of the Python-level random generators the forward's code could reach, seen
    while it ran (``draw_sources`` adds those kept on the modules): a ``random.Random`` whose C methods it called
    (``random.random()``, ``prng.random()``), a generator its arguments or closure variables held at a function's
    call, and those reached from a module global its code loaded along the attribute names the code used
    (``random.random`` -> the ``random`` module's global generator, ``np.random.rand`` -> NumPy's global
    ``RandomState``). Candidates only: ``capture`` refuses those whose state a call of the forward moves
    (``rng_state``; session 19: session 18 refused on names in the code, so a forward calling ``np.sqrt`` or drawing
    only in training was refused, and a NumPy ``Generator`` it drew from was not seen)."""
    called: frozenset[types.CodeType] = frozenset()
    """The code objects of the user code the forward ran: a function among them (a hook, a property's getter, a
    method, a lambda kept on the module) has its closure's variables and its defaults watched."""


@dataclasses.dataclass
class Drawn:
    """The draws this thread made from ``random.Random`` generators while a forward ran, seen by
    ``traced_reads``' profile function (a C method of one called: ``random``, ``getrandbits``, ``seed``; a Python
    method of a subclass called), sorted by who drew
    (``_user_draw``): ``user``, the ids of the generators the user's code drew from (the forward's own draws);
    ``lib``, those only torch, the packages torch requires or the standard library drew from (inductor's
    ``tempfile`` names and ``sympy``'s ``_assumptions_rng`` while a compiled module compiles, a debug dump through
    ``tempfile.NamedTemporaryFile``): their values name files or steer a compiler, they do not reach the outputs
    (session 20: a deterministic ``torch.compile``d module and a forward using ``tempfile`` were refused).
    ``profiled``: whether the profile function ran at all (not under a C profiler such as ``cProfile``): where it
    did not, both sets are empty and nothing is known. NumPy's draws are not seen (its generators' methods are
    Cython functions, which send the profile function no event): a moved NumPy generator is judged by
    ``DrawWatch``'s control interval."""

    user: set[int] = dataclasses.field(default_factory=set)
    lib: set[int] = dataclasses.field(default_factory=set)
    profiled: bool = False
    entropy: list[str] = dataclasses.field(default_factory=list)
    """Reads of OS entropy by the user's code (``_user_frame``), each "what, at file:line (source)": ``os.urandom``
    called (so ``random.SystemRandom``, ``secrets``, ``uuid.uuid4`` and NumPy's unseeded ``SeedSequence``:
    ``np.random.default_rng()``, ``RandomState()``, ``np.random.seed()``), ``random.Random.seed`` with no seed
    (``random.Random()``, ``random.seed()``), ``torch.Generator.seed()``. A generator made so in forward has no
    state before the call for ``DrawWatch`` to compare (session 20's fresh tester: a 50/50 branch on
    ``np.random.default_rng()`` captured 3 of 6 times, then 8-9 of 15 calls wrong): any such read refuses
    (``entropy_refusal``), whether or not it reaches the outputs (a ``uuid4`` log id is refused too: the safe
    direction). Reads by torch, the standard library (``tempfile``'s names) or a package torch requires on their own
    behalf are not listed."""
    seeds: list[tuple[str, int, int | None]] = dataclasses.field(default_factory=list)
    """(where, id of the generator, digest) of each seed the user's code gave a ``random.Random`` (``Random(x)``,
    ``rng.seed(x)``: the seed's digest) and of each generator a user function held in a local or returned, at its
    return (its state's digest; NumPy's seeding calls send no event, so a ``default_rng(seed)`` is seen here). Two
    eager calls on the same inputs give the same list when every seed is a constant or comes from the inputs;
    a seed from the clock (``random.Random(time.time_ns())``) gives another one (``capture._varies``). NumPy
    seeds given to a ``BitGenerator`` (``default_rng(s)``) are seen through its ``ISeedSequence`` check
    (``_numpy_seed``; id 0)."""
    suspect: list[str] = dataclasses.field(default_factory=list)
    """What the user's code did that may make a call's answer differ from the next one's without being an entropy
    read for sure, each "what, at file:line (source)": a read of the wall or process clock (``time.time``,
    ``perf_counter``, ``datetime.now``, ...); a NumPy generator made with an argument that read OS entropy
    (``np.random.RandomState(seed)`` reads it first and then seeds from ``seed``: its events are those of
    ``RandomState()``; ``default_rng(s)`` with ``s`` None). Reasons for capture's second eager call."""
    np_unseeded: tuple[int, int] | None = None
    """(id, ``f_lasti``) of the user frame whose current call just asked NumPy for a generator with no seed (an
    ``ISeedSequence`` check of None): the OS entropy read that follows is NumPy's seeding."""
    unseeded: dict[int, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    """id -> (generator, "what, at FILE:LINE") of each ``random.Random`` the user's code seeded with no seed (from OS
    entropy: ``random.Random()``, ``rng.seed()``) and neither drew from nor seeded again with a value since: seeded
    again before any draw (``rng = random.Random(); rng.seed(5)``), its entropy reaches nothing and it leaves this
    table (review21b finding 6: refused before); a draw from it (any C method but ``seed``) moves it to ``entropy``,
    as does the forward ending with it still here (``entropy_refusal``: it may be drawn from in a later call)."""
    files: list[str] = dataclasses.field(default_factory=list)
    """Files the user's code opened for reading while the forward ran, each "open('PATH', 'MODE'), at FILE:LINE
    (source)" (seen by an audit hook, ``_audit``: ``open()``, ``os.open``, ``io.open``, also through ``pathlib``,
    ``codecs``, ``gzip``, ``bz2``, ``lzma``): ``/dev/urandom`` is OS entropy, any other file's bytes may change
    between calls (review21b: ``open('/dev/urandom')`` in forward was captured 5 of 8 times). Opened for writing
    only (a log file) does not count; nor torch's, the standard library's own reads (``linecache``) or an import's."""
    consumed: dict[int, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    """id -> (object, "what, at FILE:LINE (source)") of each list, dict, set, deque or iterator whose length
    (``len``) or next value (``next``) the user's code used as a value (``_consumed``): a place that only grows or
    an ``itertools.count`` is per-call scratch only when no such use of it was seen (``_Reached.moves``; session 21:
    ``sign(len(self.log))`` and ``next(self.calls) % 5`` were captured, then 4 of 20 calls differed from eager).
    Objects are held here (alive while the capture checks them)."""


@contextlib.contextmanager
def traced_reads(module: torch.nn.Module, drawn: Drawn | None = None) -> Iterator[list[ForwardReads]]:
    """Record the attribute names looked up on ``module``'s submodules while the body runs (a forward);
    afterwards the yielded list holds one ``ForwardReads`` (empty when the body raised, when a trace is
    already on: traces do not nest, or for a ``torch.compile``d module: ``_compiled``).

    How: ``torch.nn.Module.__getattribute__`` is set for the body's duration (every module's attribute lookup
    then goes through one Python function, which records it for the submodules of ``module`` only) and deleted
    after. The caller holds ``modelgraph.tracelock.TORCH_TRACE_LOCK`` (capture does), so no other capture sees
    it; other threads' modules run slower meanwhile, not differently. A profile function (``sys.setprofile``, this
    thread only; chained to one already set there in Python, a ``profile.Profile``'s or a debugger's, which is called
    first on every event; not when the one set there is a C profiler's such as ``cProfile``: then none of this is
    seen) sees the Python functions the body calls: the user code among them
    (``ForwardReads.names``, ``globals``, ``called``) and the modules called outside the tree (``outside``, whose
    lookups are recorded from their call on).

    ``drawn`` (``Drawn``), when given, is filled with this thread's draws, who drew each, the user code's OS entropy
    reads, seeds, generators held in locals at return and clock reads (also for a compiled module: then only these
    are recorded, by a lighter profile function, ``_draws_seen``)."""
    box: list[ForwardReads] = []
    base = torch.nn.Module
    mods = list(module.named_modules(remove_duplicate=False))
    drawn = Drawn() if drawn is None else drawn
    if "__getattribute__" in vars(base):
        yield box
        return
    if any(_compiled(m) for _, m in mods):
        with _draws_seen(drawn), _watching_opens(drawn):
            yield box
        return
    seen: dict[int, set[str]] = {id(m): set() for _, m in mods}
    set_first: dict[int, set[str]] = {id(m): set() for _, m in mods}
    get = seen.get
    setter = vars(base)["__setattr__"]
    outside: list[torch.nn.Module] = []
    called: dict[types.CodeType, dict] = {}
    kinds: dict[types.CodeType, int] = {}
    draws: dict[int, tuple[str, Any]] = {}
    env_keys: set[Any] = set()
    rngs = _rng_types()
    prev = sys.getprofile()
    chain = prev if callable(prev) else None  # a Python profile function (a C profiler's object is not callable)
    methods: set[types.CodeType] = set()  # Python methods of a random.Random subclass (``PyRandom.random``)
    boring: set[type] = set()
    """Types of the objects whose C methods the forward called that are no generator (``rngs``) nor a
    ``torch.Generator``: their calls return at once (session 21's recorder called ``_c_call`` on every C call; the
    functions it looks for by identity are ``_NAMED_C``; a class's own C methods, ``datetime.now``, take the slow
    path)."""

    def __getattribute__(self: Any, name: str, _get: Any = object.__getattribute__) -> Any:
        names = get(id(self))
        if names is not None:
            names.add(name)
        return _get(self, name)

    def __setattr__(self: Any, name: str, value: Any) -> None:
        names = get(id(self))
        if names is not None and name not in names:
            set_first[id(self)].add(name)
        setter(self, name, value)

    def profile(frame: Any, event: str, arg: Any) -> None:
        if chain is not None:
            chain(frame, event, arg)
        if event != "call":
            if event == "c_call":
                if id(arg) not in _NAMED_C:  # the fast path: a C method of an object of a type known to be neither
                    t = type(getattr(arg, "__self__", None))  # a generator nor a torch.Generator (most calls)
                    if t in boring:
                        return
                    if not issubclass(t, rngs) and t is not torch.Generator and t is not type \
                            and not issubclass(t, io.IOBase):
                        boring.add(t)
                        return
                elif (arg is _LEN or arg is _NEXT) and kinds.get(frame.f_code) == _USER:
                    with contextlib.suppress(Exception):  # an attribute lookup that raises: not followed
                        _consumed(drawn, frame, arg)
                owner = _c_call(drawn, frame, arg, rngs)
                if owner is not None and id(owner) not in draws:
                    draws[id(owner)] = (f"a {_rng_kind(owner)} whose {arg.__name__} it called", owner)
            elif event == "return" and kinds.get(frame.f_code) == _USER:
                _returned(drawn, frame, arg, rngs)
            return
        code = frame.f_code
        if code is _ENV_GETITEM:
            env_keys.add(frame.f_locals.get("key"))
        if code is _SEED_CODE or code is _ABC_CHECK:
            _special_call(drawn, frame, code)
        kind = kinds.get(code)
        if kind is None:
            kind = kinds[code] = _code_kind(code)
            if kind == _USER:  # its arguments and closure variables as the call starts (``rng=`` passed in)
                with contextlib.suppress(Exception):  # an argument whose ``__class__`` raises: not looked at
                    for n, v in frame.f_locals.items():
                        r = _as_rng(v, rngs)
                        if r is not None and id(r) not in draws:
                            draws[id(r)] = (f"{n} in {code.co_qualname}, a {_rng_kind(r)}", r)
                    if _rng_method(code, frame, rngs):
                        methods.add(code)
        if code in methods:  # a random.Random subclass drawing in Python: no C call on it (session 20)
            with contextlib.suppress(Exception):
                _subclass_draw(drawn, frame)
        if kind == _USER:
            called.setdefault(code, frame.f_globals)
        elif kind == _CALL:
            m = frame.f_locals.get("self")
            if isinstance(m, torch.nn.Module) and id(m) not in seen:
                for sub in m.modules():
                    if id(sub) not in seen:
                        seen[id(sub)], set_first[id(sub)] = set(), set()
                        outside.append(sub)

    base.__getattribute__ = __getattribute__  # type: ignore[method-assign]
    base.__setattr__ = __setattr__  # type: ignore[method-assign]
    collecting = gc.isenabled()
    drawn.profiled = prev is None or chain is not None
    if drawn.profiled:  # a C profiler already on (cProfile): left alone, the user code not seen
        gc.disable()  # no collector callbacks (hypothesis' reads its own globals) inside the forward's reads
        sys.setprofile(profile)
    try:
        with _watching_opens(drawn):
            yield box
    finally:
        if drawn.profiled:
            sys.setprofile(prev)
            if collecting:
                gc.enable()
        base.__setattr__ = setter  # type: ignore[method-assign]
        del base.__getattribute__
    named = _name_outside(mods, outside)
    reads = _sort_reads([*mods, *named], seen, set_first)
    box.append(dataclasses.replace(reads, outside=tuple(named), **_code_reads(called, draws),
                                   env_keys=frozenset(k for k in env_keys if isinstance(k, str))))


_ENV_GETITEM = os._Environ.__getitem__.__code__
"""``os.environ[key]``'s code, which ``get``, ``getenv`` and ``in`` run (``traced_reads`` records its ``key``)."""

_OPEN_WATCH: tuple[int, Drawn] | None = None
"""(thread id, ``Drawn``) while a forward runs under ``traced_reads`` on that thread: ``_audit`` records into it."""
_AUDITING = False
_OPENERS = tuple(os.path.normcase(os.path.join(lib, n)) for lib in {sysconfig.get_paths()["stdlib"],
                                                                    sysconfig.get_paths()["platstdlib"]}
                 for n in ("pathlib", "codecs.py", "gzip.py", "bz2.py", "lzma.py", "_pyio.py", "io.py", "fileinput.py",
                           "tarfile.py", "zipfile"))
"""The standard library's modules that open a file for their caller (``Path.read_bytes``, ``gzip.open``): an open
made in them is the caller's (``_opened`` looks past them)."""


def _audit(event: str, args: tuple) -> None:
    """The process's audit hook (``sys.addaudithook``, added once, by ``_watching_opens``; it cannot be removed): an
    ``open`` event on the thread ``_OPEN_WATCH`` names is recorded (``_opened``); every other event returns at the
    first test. Never raises (an audit hook's exception would fail the user's own ``open``)."""
    global _OPEN_WATCH
    if event != "open" or _OPEN_WATCH is None:
        return
    watch = _OPEN_WATCH
    if watch[0] != threading.get_ident():
        return
    _OPEN_WATCH = None  # what ``_opened`` itself opens (``linecache`` reading the source line) is not looked at
    try:
        _opened(watch[1], args, sys._getframe(1))
    except Exception:  # pragma: no cover - a path whose repr raises: not recorded
        pass
    finally:
        _OPEN_WATCH = watch


def _file_read(drawn: Drawn, frame: Any, call: str) -> None:
    """A file read with no ``open`` event (``_FILE_CALLS``, ``_IO_READS``) by the user's code: into ``Drawn.files``."""
    f = frame
    while f is not None and f.f_code.co_filename in _PATH_HELPERS:  # os.path.exists' stat: its caller's
        f = f.f_back
    mine, f = _user_frame(f) if f is not None else (False, None)
    if not mine or f is None:
        return
    text = f"{call}, at {_line_of(f)}"
    if text not in drawn.files and len(drawn.files) < 8:
        drawn.files.append(text)


def _opened(drawn: Drawn, args: tuple, frame: Any) -> None:
    """An ``open`` audit event (``args``: path, mode, flags; ``frame``: the frame calling the C opener): a read-mode
    open by the user's code (past ``_OPENERS``; not torch's, ``modelgraph``'s, the standard library's nor an import's,
    ``<frozen importlib...>``, a module body's, nor one a package torch requires makes for torch: ``_user_frame``) into
    ``Drawn.files``. Write-only opens (a log file) are not reads."""
    path, mode, flags = (*tuple(args), None, None, None)[:3]
    if isinstance(mode, str):
        reads = "r" in mode or "+" in mode
    elif isinstance(flags, int):
        reads = flags & os.O_ACCMODE != os.O_WRONLY
    else:
        reads = True
    if not reads:
        return
    f = frame
    while f is not None and os.path.normcase(f.f_code.co_filename).startswith(_OPENERS):
        f = f.f_back
    mine, f = _user_frame(f) if f is not None else (False, None)
    if not mine or f is None:  # torch's (inductor's lock files through filelock), a module body's (an import)
        return
    call = f"open({path!r}, {mode!r})" if isinstance(mode, str) else f"os.open({path!r})"
    text = f"{call}, at {_line_of(f)}"
    if text not in drawn.files and len(drawn.files) < 8:
        drawn.files.append(text)


@contextlib.contextmanager
def _watching_opens(drawn: Drawn) -> Iterator[None]:
    """Record into ``drawn`` (``Drawn.files``) the files this thread's user code opens for reading in the body."""
    global _OPEN_WATCH, _AUDITING
    if not _AUDITING:
        sys.addaudithook(_audit)
        _AUDITING = True
    prev, _OPEN_WATCH = _OPEN_WATCH, (threading.get_ident(), drawn)
    try:
        yield
    finally:
        _OPEN_WATCH = prev


def _rng_method(code: types.CodeType, frame: Any, rngs: tuple[type, ...]) -> bool:
    """Whether ``code`` (user code, at its first call) is a method of a ``random.Random`` subclass run on the
    generator (its ``self`` one): a draw in Python (``PyRandom.random``, the ``random`` docs' way to plug in another
    generator) calls no C method of it."""
    if not code.co_argcount or code.co_varnames[0] != "self":
        return False
    me = frame.f_locals.get("self")
    return isinstance(me, _random.Random) and type(me).__module__ not in ("random", "_random")


@contextlib.contextmanager
def _draws_seen(drawn: Drawn) -> Iterator[None]:
    """A profile function (this thread; chained to a Python one already set, none under a C profiler) that only
    records the draws into ``drawn`` (``Drawn``): for a compiled module, whose attribute lookups ``traced_reads``
    does not trace."""
    prev = sys.getprofile()
    chain = prev if callable(prev) else None
    drawn.profiled = prev is None or chain is not None
    if not drawn.profiled:
        yield
        return
    _dynamo_skips()
    rngs = _rng_types()
    kinds: dict[types.CodeType, int] = {}
    methods: set[types.CodeType] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if chain is not None:
            chain(frame, event, arg)
        if event == "c_call":
            _c_call(drawn, frame, arg, rngs)
        elif event == "call":
            code = frame.f_code
            if code is _SEED_CODE or code is _ABC_CHECK:
                _special_call(drawn, frame, code)
            if code not in kinds:
                kinds[code] = _code_kind(code)
                if kinds[code] == _USER and _rng_method(code, frame, rngs):
                    methods.add(code)
            if code in methods:
                with contextlib.suppress(Exception):
                    _subclass_draw(drawn, frame)
        elif event == "return" and kinds.get(frame.f_code) == _USER:
            _returned(drawn, frame, arg, rngs)

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(prev)


@functools.lru_cache(maxsize=1)
def _dynamo_skips() -> None:
    """Tell torch's compiler (dynamo) to skip the functions ``_draws_seen``' profile function calls, and all they
    call: while a compiled module runs, a Python function the profile function calls is a frame dynamo would
    compile (session 21: it compiled ``_c_call`` and failed on ``random.Random`` in it, InternalTorchDynamoError
    from the user's forward). Nothing where torch has no such hook."""
    with contextlib.suppress(Exception):
        from torch._dynamo.eval_frame import FrameAction, FrameExecStrategy, set_code_exec_strategy
        for f in (_c_call, _special_call, _returned, _note_draw, _code_kind, _rng_method, _as_rng, _rng_kind):
            set_code_exec_strategy(f.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))


_RANDOM_CODE, _LIB_DRAW, _USER_DRAW, _REQUIRED = 0, 1, 2, 3
_DRAWERS: dict[types.CodeType, int] = {}
"""Who each code object's draws are (``_drawer_kind``), cached."""


@functools.lru_cache(maxsize=1)
def _torch_requires() -> tuple[str, ...]:
    """Path prefixes of the top-level packages of the distributions torch requires (its ``Requires-Dist``: sympy,
    networkx, jinja2, filelock, fsspec, triton, ...), from ``importlib.metadata``, in every site-packages directory
    (``_SITE``); () where it cannot tell."""
    import importlib.metadata as md
    import re
    prev = sys.getprofile()  # read without ``traced_reads``' profile function (0.1 s alone, seconds under it: it
    off = callable(prev)  # opens every distribution's metadata; session 22); a C profiler (cProfile) is left on
    if off:
        sys.setprofile(None)
    try:
        wanted = {re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0].lower().replace("_", "-")
                  for r in md.requires("torch") or ()}
        tops = [top for top, dists in md.packages_distributions().items()
                if any(d.lower().replace("_", "-") in wanted for d in dists)]
    except Exception:
        return ()
    finally:
        if off:
            sys.setprofile(prev)
    return tuple(site + top + sep for top in tops for site in _SITE for sep in (os.sep, ".py"))


_RANDOM_FILES = tuple(os.path.normcase(m.__file__) for m in (random, secrets, uuid, torch.random))
"""Files whose draws and entropy reads are made for their caller (``random.py``, ``secrets``, ``uuid.uuid4``,
``torch.seed()``): ``_user_frame`` looks past them."""
_URANDOM = os.urandom
_OTHER_ENTROPY = frozenset(id(f) for f in (getattr(os, "getrandom", None),
                                          getattr(__import__("ssl"), "RAND_bytes", None))
                           if f is not None)
"""ids of the other C functions that read OS entropy (``os.getrandom``, ``ssl.RAND_bytes``): as ``os.urandom``."""
_NAMED_C = frozenset({id(len), id(next), id(_URANDOM), *_OTHER_ENTROPY})
"""ids of the C functions ``traced_reads``' profile function looks for by identity (with ``_CLOCKS``, added below)."""
_SEED_CODE = random.Random.seed.__code__
_CLOCKS = frozenset(id(f) for f in (time.time, time.time_ns, time.monotonic, time.monotonic_ns, time.perf_counter,
                                    time.perf_counter_ns, time.process_time, time.process_time_ns, time.thread_time,
                                    time.thread_time_ns, time.localtime, time.gmtime, time.ctime, time.asctime,
                                    time.strftime, time.clock_gettime, time.clock_gettime_ns, os.times))
"""ids of the ``time`` functions that read a clock (``localtime()`` & co. with no argument read it too;
``clock_gettime(clk_id)`` with any clock) and ``os.times`` (session 24: not seen before)."""
_NAMED_C = _NAMED_C | _CLOCKS
_FILE_CALLS = {id(f): f.__name__ for f in (getattr(os, n, None) for n in (
    "read", "pread", "readv", "preadv", "stat", "lstat", "fstat", "listdir", "scandir", "access", "readlink"))
    if f is not None}
"""ids of the ``os`` functions that read a file or its metadata through a descriptor or a path with no ``open``
audit event (``os.pread(self.fd, ...)``, ``os.path.exists`` / ``getsize``'s ``os.stat``): as a file ``open``."""
_NAMED_C = _NAMED_C | frozenset(_FILE_CALLS)
_PATH_HELPERS = frozenset({"<frozen genericpath>", "<frozen posixpath>", "<frozen ntpath>", "<frozen os>",
                           *(m.__file__ for m in (os, os.path, __import__("genericpath"), __import__("pathlib")))})
"""Files of the path helpers whose ``os.stat`` & co. are made for their caller (``os.path.exists``, ``Path.is_file``);
a logging handler's own checks (``RotatingFileHandler``) are not the user's."""
_IO_READS = frozenset({"read", "read1", "readline", "readlines", "readinto", "readinto1", "readall"})
"""Methods of a file object (``io.IOBase``) that read it: a handle opened in ``__init__`` read in forward."""


CLOCK_RUNS = 6
"""How many times ``capture._varies`` runs a forward that read a clock, each on faked clocks from one of
``clock_bases()``. Two runs sample two values of the clock: a branch true on one residue of five
(``time.time_ns() % 5 == 4``), on an hour range or a weekend took the same side in both (session 23's list). Six
runs from bases ``CLOCK_SHIFT_NS`` apart take every residue mod 2, 3, 4 and 5 (``tests/test_user_models24.py``
checks the property on the values)."""
CLOCK_SHIFT_NS = 103_248_709_090_909
"""How far apart ``clock_bases()`` are (ns): 1 day 4 h 40 min 48.709090909 s, found by a search (session 24) so that
for the ``CLOCK_RUNS`` bases from the start of a day, at every unit (1 ns to 1 s by powers of ten, a minute, an hour,
a day) the clock's counts take every residue mod 2 to 5 (also after up to 50 reads of ``CLOCK_TICK_NS``), the local
hour of the day (any UTC offset in quarter hours) leaves no gap over 4.7 h, the fraction of a second none over
0.3 s, and at least one run falls on a weekend and one not, whatever the day. The old two runs' shift (1 d 1 h
1 min 1 s 1 ms 1 us 1 ns) flipped parities only."""
CLOCK_TICK_NS = 1000
"""How far ``fake_clocks``' clocks move on each read (ns)."""
CLOCK_STEP_NS = 6 * 10**7
"""``fake_clocks``' clocks also follow the true time, in steps of 60 ms (a multiple of 60 ns, us and ms: residues mod
2 to 5 and 6 at those units stay as the bases put them), so a forward polling the clock until a deadline still
ends."""
_FAKED = ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "process_time",
          "process_time_ns", "thread_time", "thread_time_ns", "localtime", "gmtime", "ctime", "asctime", "strftime",
          "clock_gettime", "clock_gettime_ns")
_DAY_NS = 86_400 * 10**9
_REAL_DATETIME, _REAL_DATE = datetime.datetime, datetime.date
_DATE_CLOCKS = ("now", "utcnow", "today")
"""The ``datetime.datetime`` / ``datetime.date`` class methods that read the clock (``date`` has ``today`` only)."""


def _faked(name: str, real: Any, mine: Any, now: Any) -> Any:
    """``real`` (the ``time`` function ``name``) reading ``now()`` (ns) where ``mine()`` (the faking thread while
    ``fake_clocks`` is on), as it is elsewhere: a fake bound during the run (``self.clock = time.perf_counter``, a
    module imported in forward with ``from time import perf_counter``) reads the true clock once it ends."""
    if name in ("clock_gettime", "clock_gettime_ns"):  # any clock id: one base for all, as the other clocks
        if name.endswith("_ns"):
            return functools.wraps(real)(lambda clk_id: now() if mine() else real(clk_id))
        return functools.wraps(real)(lambda clk_id: now() / 1e9 if mine() else real(clk_id))
    if name.endswith("_ns"):
        return functools.wraps(real)(lambda: now() if mine() else real())
    if name in ("localtime", "gmtime", "ctime"):
        def at(secs: Any = None) -> Any:
            if secs is None and mine():
                secs = now() / 1e9
            return real(secs)
        return functools.wraps(real)(at)
    if name in ("asctime", "strftime"):
        def fmt(*a: Any) -> Any:
            if len(a) == (0 if name == "asctime" else 1) and mine():
                a = (*a, time.localtime(now() / 1e9))
            return real(*a)
        return functools.wraps(real)(fmt)
    if name == "times":  # os.times(): process CPU time (user) and elapsed time read the fake; children's are true
        def times() -> Any:
            t = real()
            if not mine():
                return t
            s = now() / 1e9
            return os.times_result((s, 0.0, t.children_user, t.children_system, s))
        return functools.wraps(real)(times)
    return functools.wraps(real)(lambda: now() / 1e9 if mine() else real())


class _StandIn(type):
    """The metaclass of ``_fake_dates``' stand-ins: ``isinstance`` and ``issubclass`` answer as for the real class
    (``isinstance(x, datetime.datetime)`` holds for a datetime made before, or by another thread)."""

    _real: type

    def __instancecheck__(cls, obj: Any) -> bool:  # a user's subclass of a stand-in (made in the run): as usual
        return isinstance(obj, cls._real) if "_real" in vars(cls) else type.__instancecheck__(cls, obj)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, cls._real) if "_real" in vars(cls) else type.__subclasscheck__(cls, sub)


def _fake_dates(mine: Any, now: Any) -> tuple[type, type]:
    """Stand-ins for ``datetime.datetime`` and ``datetime.date`` whose ``now`` / ``utcnow`` / ``today`` read ``now()``
    (ns) where ``mine()`` (C classes: their methods cannot be replaced, so ``fake_clocks`` puts these in their places
    for the run). Subclasses of the real classes (``issubclass``, class attributes, ``fromtimestamp``, ``strptime``,
    ``combine`` as before); calling one (``datetime.datetime(2024, 1, 1)``) or any of its class methods makes an
    instance of the real class, so nothing made during the run is of a stand-in's type (pickles, ``type(x) is``
    after the run). A user's subclass defined during the run keeps its own type."""
    real_dt, real_d = _REAL_DATETIME, _REAL_DATE
    true = {n: next(vars(k)[n] for k in real_dt.__mro__ if n in vars(k)) for n in _DATE_CLOCKS}  # C descriptors
    true_today = vars(real_d)["today"]

    def split() -> tuple[int, int]:  # (seconds, microseconds) of the fake clock: exact, no float rounding
        s, ns = divmod(now(), 10**9)
        return s, ns // 1000

    class date(real_d, metaclass=_StandIn):
        _real = real_d

        def __new__(cls, *a: Any, **k: Any) -> Any:
            return real_d(*a, **k) if cls is date else real_d.__new__(cls, *a, **k)

        @classmethod
        def today(cls) -> Any:
            if not mine():
                return true_today.__get__(None, cls)()
            return cls.fromtimestamp(split()[0])

    class datetime_(real_dt, metaclass=_StandIn):
        _real = real_dt

        def __new__(cls, *a: Any, **k: Any) -> Any:
            return real_dt(*a, **k) if cls is datetime_ else real_dt.__new__(cls, *a, **k)

        @classmethod
        def now(cls, tz: Any = None) -> Any:
            if not mine():
                return true["now"].__get__(None, cls)(tz)
            s, us = split()
            return cls.fromtimestamp(s, tz).replace(microsecond=us)

        @classmethod
        def utcnow(cls) -> Any:
            if not mine():
                return true["utcnow"].__get__(None, cls)()
            s, us = split()
            return cls.fromtimestamp(s, datetime.UTC).replace(tzinfo=None, microsecond=us)

        @classmethod
        def today(cls) -> Any:
            if not mine():
                return true["today"].__get__(None, cls)()
            s, us = split()
            return cls.fromtimestamp(s).replace(microsecond=us)

    for fake, real in ((date, real_d), (datetime_, real_dt)):
        fake.__name__, fake.__qualname__, fake.__module__ = real.__name__, real.__qualname__, real.__module__
        fake.__doc__ = real.__doc__
    return datetime_, date


@contextlib.contextmanager
def fake_clocks(base_ns: int, places: Any = ()) -> Iterator[None]:
    """While the body runs, this thread's clocks read ``base_ns`` plus ``CLOCK_TICK_NS`` per read so far plus the true
    time since the start in ``CLOCK_STEP_NS`` steps (other threads read the true time through a Python wrapper
    meanwhile): the ``time`` clocks (``_FAKED``: wall, monotonic, performance, CPU; ``localtime()`` & co. with no
    argument), ``os.times()`` (user CPU and elapsed time), and ``datetime.datetime.now()`` / ``utcnow()`` /
    ``today()``, ``datetime.date.today()`` (session 24: ``now``, ``utcnow`` and ``os.times`` were not faked; the C
    ``today()`` reads ``time.time()`` through the module and was; all four now through stand-in classes,
    ``_fake_dates``, put in ``datetime``'s module attributes for the run, exact to the microsecond). Faked in the
    ``time``, ``os`` and ``datetime`` modules and in the ``(globals, name)`` ``places`` that hold a clock function,
    one of the two classes or one of their clock methods (``from time import time_ns``, ``from datetime import
    datetime, date``, ``now = datetime.now`` in the user's module). Capture runs a forward that read the clock
    ``CLOCK_RUNS`` times so, from ``clock_bases()`` (``capture._varies``): a branch on the clock takes both sides in
    these runs when it depends on a residue mod 2 to 5 of the clock's count at any unit, on the hour of the day or
    on the weekday.

    Other threads see the stand-in classes in those places meanwhile: ``isinstance``/``issubclass`` answer as for
    the real ones and what they make is of the real class, but ``type(x) is datetime.datetime`` is false there for
    the run's length (one eager forward of the user's model). Not faked: a user's own subclass of ``datetime`` defined
    before (its ``now`` is the real class's C method), NumPy's or pandas' clocks (``np.datetime64('now')``), a
    clock method bound before and kept elsewhere than the module's globals (a default argument)."""
    tid = threading.get_ident()
    on = [True]  # cleared when the body ends: a fake kept past it reads the true clock

    def mine() -> bool:
        return on[0] and threading.get_ident() == tid

    reads = [0]
    start = time.perf_counter_ns()
    perf_ns = time.perf_counter_ns

    def now() -> int:  # the true time since the start moves it too, in whole CLOCK_STEP_NS
        reads[0] += 1
        return base_ns + reads[0] * CLOCK_TICK_NS + (perf_ns() - start) // CLOCK_STEP_NS * CLOCK_STEP_NS

    saved: list[tuple[dict, str, Any]] = []
    fakes: dict[int, Any] = {}
    for n in _FAKED:
        real = getattr(time, n, None)
        if real is not None:
            fakes[id(real)] = _faked(n, real, mine, now)
            saved.append((vars(time), n, real))
    real_times = vars(os).get("times")
    if real_times is not None:
        fakes[id(real_times)] = _faked("times", real_times, mine, now)
        saved.append((vars(os), "times", real_times))
    fake_dt, fake_d = _fake_dates(mine, now)
    for real, fake in ((_REAL_DATETIME, fake_dt), (_REAL_DATE, fake_d)):
        fakes[id(real)] = fake
        for n, v in vars(datetime).items():
            if v is real:
                saved.append((vars(datetime), n, v))
    for g, n in places:
        v = g.get(n)
        if id(v) in fakes:
            saved.append((g, n, v))
        elif getattr(v, "__self__", None) in (_REAL_DATETIME, _REAL_DATE) \
                and getattr(v, "__name__", "") in _DATE_CLOCKS:
            fake = getattr(fake_dt if v.__self__ is _REAL_DATETIME else fake_d, v.__name__)  # ``now = datetime.now``
            fakes[id(v)] = fake
            saved.append((g, n, v))
    try:
        for d, n, real in saved:
            d[n] = fakes[id(real)]
        yield
    finally:
        on[0] = False
        for d, n, real in reversed(saved):
            d[n] = real


def clock_bases() -> tuple[int, ...]:
    """The ``CLOCK_RUNS`` bases ``fake_clocks`` runs a forward from: the start of today (UTC, ns), then each
    ``CLOCK_SHIFT_NS`` past the one before."""
    day = time.time_ns() // _DAY_NS * _DAY_NS
    return tuple(day + j * CLOCK_SHIFT_NS for j in range(CLOCK_RUNS))


def _drawer_kind(code: types.CodeType) -> int:
    """``_RANDOM_CODE``: the generator's own library (``random.py``, ``numpy/random``); ``_REQUIRED``: a package
    torch requires (``_torch_requires``: sympy, networkx, ...); both looked past by ``_user_draw``. ``_LIB_DRAW``:
    torch's, ``modelgraph``'s or the standard library's (not a site-packages directory's, ``_SITE``; the frozen
    modules, ``<frozen importlib._bootstrap>``: a package's draws while it is imported are its own, not the importer's);
    ``_USER_DRAW``: any other (the user's modules, torchvision, timm, code made by ``exec``)."""
    f = os.path.normcase(code.co_filename)
    if f in _RANDOM_FILES or f"{os.sep}numpy{os.sep}random{os.sep}" in f:
        return _RANDOM_CODE
    if f.startswith(_torch_requires()):
        return _REQUIRED
    if f.startswith(_NOT_USER) or (f.startswith(_STDLIB) and not f.startswith(_SITE)) or f.startswith("<frozen "):
        return _LIB_DRAW
    if not code.co_flags & inspect.CO_OPTIMIZED:  # a module's or class's body: it runs as it is imported (once)
        return _LIB_DRAW
    return _USER_DRAW


def _user_frame(frame: Any) -> tuple[bool, Any]:
    """(``_user_draw(frame)``, the nearest user frame at or above ``frame`` where there is one, else None)."""
    f = frame
    while f is not None:
        code = f.f_code
        k = _DRAWERS.get(code)
        if k is None:
            k = _DRAWERS[code] = _drawer_kind(code)
        if k in (_USER_DRAW, _LIB_DRAW):
            return k == _USER_DRAW, (f if k == _USER_DRAW else None)
        f = f.f_back
    return True, None


def _line_of(frame: Any) -> str:
    """``file.py:LINE in function (`its source line`)`` of a frame, for a refusal's message."""
    code = frame.f_code
    line = frame.f_lineno
    src = linecache.getline(code.co_filename, line).strip()
    src = f" (`{src[:100]}`)" if src else ""
    return f"{os.path.basename(code.co_filename)}:{line} in {code.co_qualname}{src}"


def _note(into: list[str], frame: Any, what: str) -> None:
    """Append "``what``, at FILE:LINE ..." to ``into`` (``Drawn.entropy`` / ``.suspect``) when the read made by
    ``frame`` is the user's code's (``_user_frame``); at most 8 entries, each once."""
    mine, at = _user_frame(frame)
    if mine and len(into) < 8:
        text = f"{what}, at {_line_of(at)}" if at is not None else what
        if text not in into:
            into.append(text)


def _c_call(drawn: Drawn, frame: Any, arg: Any, rngs: tuple[type, ...]) -> Any:
    """A profile function's ``c_call`` event (``frame`` calls the C function ``arg``), recorded into ``drawn``: a
    draw from a generator (returned), an OS entropy read (``os.urandom``, ``torch.Generator.seed``: ``entropy``), a
    clock read (``clock``). None when it drew from no generator."""
    owner = getattr(arg, "__self__", None)
    if isinstance(owner, rngs):
        if drawn.unseeded and id(owner) in drawn.unseeded and getattr(arg, "__name__", "") != "seed":
            _drawn_unseeded(drawn, owner)
        _note_draw(drawn, owner, frame)
        return owner
    if arg is _URANDOM:
        _urandom(drawn, frame)
    elif id(arg) in _FILE_CALLS or (isinstance(owner, io.IOBase) and getattr(arg, "__name__", "") in _IO_READS):
        _file_read(drawn, frame, f"os.{_FILE_CALLS[id(arg)]}()" if id(arg) in _FILE_CALLS
                   else f"{type(owner).__name__}.{arg.__name__}() of {getattr(owner, 'name', '?')!r}")
    elif id(arg) in _OTHER_ENTROPY:
        _note(drawn.entropy, frame, getattr(arg, "__name__", "an OS entropy read"))
    elif id(arg) in _CLOCKS or (isinstance(owner, type) and issubclass(owner, _REAL_DATE)
                                and getattr(arg, "__name__", "") in _DATE_CLOCKS):
        _note(drawn.suspect, frame, f"a clock read, {getattr(arg, '__name__', '?')}()")
    elif isinstance(owner, torch.Generator) and getattr(arg, "__name__", "") == "seed":
        _note(drawn.entropy, frame, "torch.Generator.seed()")
    return None


_LEN, _NEXT = len, next
_INSTRUCTIONS: dict[types.CodeType, tuple[list[dis.Instruction], dict[int, int]]] = {}
_SITES: dict[tuple[types.CodeType, int], Any] = {}
"""``_site``'s answers, by (code, offset of the CALL)."""
_ROOTS = frozenset({"LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE", "LOAD_CLASSDEREF", "LOAD_GLOBAL", "LOAD_NAME"})
_GROWERS = frozenset({"append", "appendleft", "add"})


def _instructions(code: types.CodeType) -> tuple[list[dis.Instruction], dict[int, int]]:
    """``code``'s instructions and {offset: index}, cached."""
    got = _INSTRUCTIONS.get(code)
    if got is None:
        ins = list(dis.get_instructions(code))
        got = _INSTRUCTIONS[code] = (ins, {x.offset: i for i, x in enumerate(ins)})
    return got


def _chain_back(ins: list[dis.Instruction], k: int) -> tuple[int, tuple] | None:
    """(index of its first instruction, (root op, root name), attribute names...) of the plain load chain
    (``self.h.log``, ``LOG``, ``log``) whose last instruction is ``ins[k]``; None for any other expression."""
    attrs: list[str] = []
    while k >= 0 and ins[k].opname == "LOAD_ATTR":
        attrs.insert(0, ins[k].argval)
        k -= 1
    if k < 0 or ins[k].opname not in _ROOTS or not isinstance(ins[k].argval, str):
        return None
    return k, (("global" if ins[k].opname in ("LOAD_GLOBAL", "LOAD_NAME") else "local", ins[k].argval), *attrs)


def _site(code: types.CodeType, lasti: int) -> Any:
    """What the call at ``lasti`` in ``code`` (``len(X)`` / ``next(X)``, one argument) does with its result: None when
    it only names or records (the next instruction formats it, ``f"s{next(ids)}"``; or it is the key stored into X
    itself, ``d[len(d)] = v``, or appended to X itself, ``log.append(len(log))``), else the argument's load chain
    (``_chain_back``; () where the argument is another expression: not followed)."""
    key = (code, lasti)
    if key in _SITES:
        return _SITES[key]
    ins, at = _instructions(code)
    i = at.get(lasti)
    out: Any = ()
    if i is not None and i >= 2 and ins[i].opname == "CALL" and ins[i].arg == 1 and ins[i - 1].opname == "PRECALL":
        found = _chain_back(ins, i - 2)
        after = ins[i + 1] if i + 1 < len(ins) else None
        if found is not None:
            j, chain = found
            out = chain
            if after is not None and (after.opname == "FORMAT_VALUE" or _formatted_spec(ins, i + 1) or (
                    after.opname == "PRECALL" and after.arg == 1 and j >= 2 and ins[j - 2].opname == "LOAD_GLOBAL"
                    and ins[j - 2].argval in _NAMERS)):  # f"{next(ids)}", f"{next(ids):04d}", str(next(ids))
                out = None
            elif after is not None and after.opname == "STORE_SUBSCR" and j >= 2:
                into = _chain_back(ins, j - 2)
                if into is not None and into[1] == chain:
                    out = None
            elif after is not None and after.opname == "PRECALL" and after.arg == 1 and j >= 2 \
                    and ins[j - 2].opname == "LOAD_METHOD" and ins[j - 2].argval in _GROWERS:
                into = _chain_back(ins, j - 3)
                if into is not None and into[1] == chain:
                    out = None
        elif after is not None and after.opname == "FORMAT_VALUE":
            out = None
    _SITES[key] = out
    return out


_NAMERS = frozenset({"str", "repr", "hex", "oct", "bin", "format"})
"""Builtins that only make a name of the value they are given (``str(next(ids))``)."""


def _formatted_spec(ins: list[dis.Instruction], k: int) -> bool:
    """``ins[k:]`` formats the value below with a constant spec (``LOAD_CONST '04d'; FORMAT_VALUE``)."""
    return (k + 1 < len(ins) and ins[k].opname == "LOAD_CONST" and isinstance(ins[k].argval, str)
            and ins[k + 1].opname == "FORMAT_VALUE")


def _static_attr(v: Any, name: str) -> Any:
    """``v.name`` without running a property or ``__getattr__`` (an instance's ``__dict__``, a module's tables, a
    class attribute that is no descriptor); ``_MISSING`` otherwise."""
    if isinstance(v, torch.nn.Module):
        for table in ("_modules", "_parameters", "_buffers"):
            t = vars(v).get(table)
            if isinstance(t, dict) and name in t:
                return t[name]
    got = inspect.getattr_static(v, name, _MISSING)
    if isinstance(got, types.MemberDescriptorType):  # a ``__slots__`` field
        return getattr(v, name, _MISSING)
    return _MISSING if isinstance(got, property) else got


def _consumed(drawn: Drawn, frame: Any, fn: Any) -> None:
    """A ``c_call`` of ``len`` or ``next`` (``fn``) by the user's code in ``frame``: where its result is used as a
    value (``_site``), the argument (a list, dict, set, deque or C iterator, found along its load chain in the frame)
    into ``Drawn.consumed``."""
    chain = _site(frame.f_code, frame.f_lasti)
    if not chain or len(drawn.consumed) >= 1000:
        return
    (where, root), *attrs = chain
    v = (frame.f_locals.get(root, _MISSING) if where == "local"
         else frame.f_globals.get(root, vars(builtins).get(root, _MISSING)))
    for a in attrs:
        if v is _MISSING:
            return
        v = _static_attr(v, a)
    if isinstance(v, list | dict | set | collections.deque) or _c_iterator(v):
        text = ".".join((root, *attrs))
        drawn.consumed.setdefault(id(v), (v, f"{fn.__name__}({text}) used as a value, at {_line_of(frame)}"))


def _drawn_unseeded(drawn: Drawn, r: Any) -> None:
    """A draw (or a state read or set) from ``r``, a generator the user's code seeded from OS entropy and did not
    seed again (``Drawn.unseeded``): the entropy reaches what it draws (``Drawn.entropy``)."""
    _, text = drawn.unseeded.pop(id(r))
    if text not in drawn.entropy and len(drawn.entropy) < 8:
        drawn.entropy.append(text)


def _urandom(drawn: Drawn, frame: Any) -> None:
    """``os.urandom`` called by ``frame``: an entropy read of the user's (``Drawn.entropy``), unless it is NumPy
    seeding a generator the user's current call asked for with an argument (``Drawn.np_unseeded``, ``_call_args``):
    ``RandomState(seed)`` (``Drawn.suspect``)."""
    mine, at = _user_frame(frame)
    if not mine:
        return
    if at is not None and drawn.np_unseeded == (id(at), at.f_lasti) and _call_args(at):
        _note(drawn.suspect, frame, "a NumPy generator made with an argument that read OS entropy (a legacy "
                                    "RandomState(seed) does, then seeds from seed)")
        return
    _note(drawn.entropy, frame, "os.urandom")


_ARGC: dict[tuple[types.CodeType, int], int] = {}
"""``_call_args``' answers, by (code, instruction offset)."""


def _call_args(frame: Any) -> int:
    """How many arguments the call ``frame`` is making now passes (its ``CALL`` instruction's count; a call with
    ``*args`` / ``**kw``: 1, it may pass some); 0 where it cannot tell (then an entropy read under it refuses)."""
    key = (frame.f_code, frame.f_lasti)
    n = _ARGC.get(key)
    if n is None:
        n = 0
        for ins in dis.get_instructions(frame.f_code):
            if ins.offset == frame.f_lasti:
                n = 1 if ins.opname == "CALL_FUNCTION_EX" else (ins.arg or 0) if ins.opname.startswith("CALL") else 0
                break
        _ARGC[key] = n
    return n


_ABC_CHECK = abc.ABCMeta.__instancecheck__.__code__


def _seed_key(v: Any) -> Any:
    """A seed's value for ``_digest``: a NumPy ``SeedSequence``'s entropy, spawn key and pool size (not its
    identity), an array's bytes, else the value."""
    if hasattr(v, "entropy") and hasattr(v, "spawn_key"):
        return repr(v.entropy), tuple(v.spawn_key), getattr(v, "pool_size", None)
    if hasattr(v, "tobytes") and hasattr(v, "dtype"):
        return str(v.dtype), v.tobytes()
    return v


def _numpy_seed(drawn: Drawn, frame: Any) -> None:
    """A call of ``ABCMeta.__instancecheck__`` (``frame``): when it asks whether a seed is NumPy's
    ``ISeedSequence`` (every ``BitGenerator`` does, so ``default_rng(s)``, ``PCG64(s)``), the seed the user's code
    gave: None, ``Drawn.np_unseeded``; else its digest in ``Drawn.seeds`` (NumPy's seeding is Cython, with no
    event of its own)."""
    bg = sys.modules.get("numpy.random.bit_generator")
    with contextlib.suppress(Exception):  # a seed whose hash or repr raises: not recorded
        if bg is None or frame.f_locals.get("cls") is not getattr(bg, "ISeedSequence", None):
            return
        mine, at = _user_frame(frame.f_back)
        if not mine or at is None:
            return
        seed = frame.f_locals.get("instance")
        if seed is None:
            drawn.np_unseeded = (id(at), at.f_lasti)
        else:
            drawn.seeds.append((f"the seed of a NumPy generator at {_line_of(at)}", 0, _digest(_seed_key(seed))))


def _special_call(drawn: Drawn, frame: Any, code: types.CodeType) -> None:
    """A ``call`` event of ``random.Random.seed`` or ``ABCMeta.__instancecheck__`` (``code``), into ``drawn``."""
    if code is _SEED_CODE:
        _seeded(drawn, frame)
    elif code is _ABC_CHECK:
        _numpy_seed(drawn, frame)


def _seeded(drawn: Drawn, frame: Any) -> None:
    """A call of ``random.Random.seed`` (``frame``; ``random.Random(x)`` and ``random.seed(x)`` call it): with no
    seed, an entropy read (``Drawn.entropy``); else the seed's digest in ``Drawn.seeds``. The user's code's only."""
    with contextlib.suppress(Exception):  # a seed whose hash or repr raises: not recorded
        a = frame.f_locals.get("a")
        me = frame.f_locals.get("self")
        if a is None:
            mine, at = _user_frame(frame)
            if mine:
                what = "random.Random seeded with no seed (from OS entropy)"
                drawn.unseeded[id(me)] = (me, f"{what}, at {_line_of(at)}" if at is not None else what)
            return
        drawn.unseeded.pop(id(me), None)  # seeded again with a value before any draw: the entropy reaches nothing
        mine, at = _user_frame(frame)
        if mine:
            where = f"the seed of a random.Random at {_line_of(at)}" if at is not None else "a random.Random's seed"
            drawn.seeds.append((where, id(frame.f_locals.get("self")), _digest(a)))


def _returned(drawn: Drawn, frame: Any, arg: Any, rngs: tuple[type, ...]) -> None:
    """A user function's ``return`` event: the state digest of each generator it holds in a local or returns, into
    ``Drawn.seeds`` (a NumPy generator seeded in the call sends no event of its own)."""
    code = frame.f_code
    if not code.co_flags & inspect.CO_OPTIMIZED:  # a module body (an import): its globals, not a call's locals
        return
    with contextlib.suppress(Exception):  # a local whose ``__class__`` raises: not looked at
        for n, v in [*frame.f_locals.items(), ("its return value", arg)]:
            r = _as_rng(v, rngs)
            if r is not None:
                drawn.seeds.append((f"{n} in {code.co_qualname} ({os.path.basename(code.co_filename)}:"
                                    f"{code.co_firstlineno})", id(r), digest_or_none(r)))


def entropy_refusal(drawn: Drawn, label: str) -> str | None:
    """The refusal for a forward whose user code read OS entropy (``Drawn.entropy``, and the generators seeded with no
    seed and still unseeded by a value at the forward's end, ``Drawn.unseeded``) or opened a file for reading
    (``Drawn.files``), or None."""
    for _, text in drawn.unseeded.values():
        if text not in drawn.entropy:
            drawn.entropy.append(text)
    drawn.unseeded.clear()
    if not drawn.entropy and drawn.files:
        return (f"{label} reads a file in forward ({'; '.join(drawn.files[:3])}): its bytes (OS entropy from "
                "/dev/urandom, or a file that may change) may decide the outputs, the graph keeps what they decided "
                "while torch.export traced it and eager reads anew on every call; read it once outside forward and "
                "pass what it holds as an input or keep it on the module")
    if not drawn.entropy:
        return None
    return (f"{label} reads OS entropy in forward ({'; '.join(drawn.entropy[:3])}): a generator made from it (or "
            "the bytes read) may decide the outputs, the graph keeps what they decided while torch.export traced it "
            "and eager decides anew on every call; seed the generator with a constant (random.Random(0), "
            "np.random.default_rng(0)), pass the draw as an input, or make it outside forward")


def _user_draw(frame: Any) -> bool:
    """Whether the draw made by ``frame`` (the frame calling the generator) is the user's: the nearest frame
    outside the generator's own library (``random.py``, ``numpy/random``) and the packages torch requires (sympy,
    networkx: ``_drawer_kind``) is user code. A draw torch's or the standard library's code makes (itself or
    through such a package: compile -> inductor -> sympy) steers that library (a temporary file's name, a
    compiler's guess), not the user's values; one a package makes for the user's code (``sympy.randprime``,
    ``networkx.gnp_random_graph(seed=rng)`` called in forward) is the user's (review20b finding 1: skipped, such a
    forward was captured and 9/20 and 20/30 later calls were wrong). All library frames: the user's."""
    return _user_frame(frame)[0]


def _name_only(r: Any) -> bool:
    """Whether ``r`` is a generator known to only name things or shuffle a search, whose draws never reach a value:
    ``tempfile``'s file names (``tempfile._name_sequence``'s), sympy's assumption-rule shuffle
    (``sympy.core.random._assumptions_rng``). Needed beside the frame rule (``_user_draw``): sympy is a package torch
    requires, looked past, so a forward calling sympy would make that shuffle's draws the user's; and a library's
    draw from a generator the model reaches (``DrawWatch.judge``: ``draw_sources`` lists every generator the
    forward's code drew from, tempfile's too) is judged as the user's unless it is one of these."""
    seq = getattr(sys.modules.get("tempfile"), "_name_sequence", None)
    return r is not None and (r is getattr(seq, "_rng", None) or
                              r is getattr(sys.modules.get("sympy.core.random"), "_assumptions_rng", None))


def _subclass_draw(drawn: Drawn, frame: Any) -> None:
    """A call of a Python method of a ``random.Random`` subclass (``frame``) on its generator: a draw from it (a
    ``seed`` method: not a draw, ``_seeded`` sees it)."""
    r = frame.f_locals["self"]
    if drawn.unseeded and id(r) in drawn.unseeded and frame.f_code.co_name != "seed":
        _drawn_unseeded(drawn, r)
    _note_draw(drawn, r, frame.f_back)


def _note_draw(drawn: Drawn, r: Any, frame: Any) -> None:
    """Record in ``drawn`` one draw from the generator ``r`` made by ``frame`` (``_user_draw``; a name-only
    generator's, ``_name_only``, is a library's wherever it is made)."""
    (drawn.user if not _name_only(r) and _user_draw(frame) else drawn.lib).add(id(r))


def _rng_types() -> tuple[type, ...]:
    """The Python-level generator classes: ``random.Random`` (``random.SystemRandom``, stateless, left out by
    ``_as_rng``), and NumPy's ``Generator``, ``RandomState`` and ``BitGenerator`` when NumPy is imported."""
    npr = sys.modules.get("numpy.random")
    extra = () if npr is None else (npr.Generator, npr.RandomState, npr.BitGenerator)
    return (_random.Random, *extra)


def _as_rng(v: Any, rngs: tuple[type, ...]) -> Any:
    """``v`` when it is a generator (``_rng_types``), the generator behind a bound method of one
    (``rng.random``, ``np.random.rand``: NumPy's global ``RandomState``), else None."""
    if isinstance(v, types.MethodType | types.BuiltinMethodType):
        v = v.__self__
    return v if isinstance(v, rngs) and not isinstance(v, random.SystemRandom) else None


def _global_rngs() -> tuple[Any, Any]:
    """The ``random`` module's global generator and NumPy's global ``RandomState`` (None where NumPy's random module
    is not imported)."""
    npr = sys.modules.get("numpy.random")
    return getattr(random, "_inst", None), None if npr is None else getattr(npr.mtrand, "_rand", None)


def _rng_kind(r: Any) -> str:
    """A generator's class for messages (``random.Random``, ``numpy.random.Generator``); the two global ones named
    as such."""
    inst, np_global = _global_rngs()
    if r is inst:
        return "random module's global generator"
    if np_global is not None and r is np_global:
        return "numpy.random module's global RandomState"
    mod = type(r).__module__
    return f"{'numpy.random' if mod.startswith('numpy.random') else mod}.{type(r).__qualname__}"


def _plain(v: Any) -> Any:
    """A generator's state in a form ``==`` compares (NumPy arrays as bytes, dicts as sorted items)."""
    if isinstance(v, dict):
        return tuple(sorted((k, _plain(x)) for k, x in v.items()))
    if isinstance(v, list | tuple):
        return tuple(map(_plain, v))
    if hasattr(v, "tobytes") and hasattr(v, "dtype"):
        return (str(v.dtype), getattr(v, "shape", ()), v.tobytes())
    return v


def rng_state(r: Any) -> Any:
    """The whole state of a generator (``_rng_types``), comparable with ``==``: ``random.Random.getstate()`` (the
    Mersenne Twister's 625 words and the cached Gaussian), a ``RandomState``'s ``get_state(legacy=False)`` (its bit
    generator's state and the cached Gaussian), a ``Generator``'s or ``BitGenerator``'s ``bit_generator.state``.
    A draw moves it; a generator seeded again to the same seed comes back to it. Costs ~10-30 us."""
    if isinstance(r, _random.Random):
        return r.getstate()
    if hasattr(r, "get_state"):  # RandomState
        return _plain(r.get_state(legacy=False))
    return _plain(r.bit_generator.state if hasattr(r, "bit_generator") else r.state)


def _raw_state(r: Any) -> Any:
    """A generator's state in the form its setter takes back (``_set_state``): ``getstate()``,
    ``get_state(legacy=False)``, ``bit_generator.state`` / ``state`` (NumPy's dicts copied, arrays with them)."""
    if isinstance(r, _random.Random):
        return r.getstate()
    if hasattr(r, "get_state"):
        return copy.deepcopy(r.get_state(legacy=False))
    return copy.deepcopy(r.bit_generator.state if hasattr(r, "bit_generator") else r.state)


def _set_state(r: Any, raw: Any) -> None:
    """Put ``_raw_state``'s value back into the generator ``r``."""
    if isinstance(r, _random.Random):
        r.setstate(raw)
    elif hasattr(r, "set_state"):
        r.set_state(raw)
    elif hasattr(r, "bit_generator"):
        r.bit_generator.state = raw
    else:
        r.state = raw


def state_or_none(r: Any) -> Any:
    """``rng_state(r)``, or None where the generator cannot give it (a user's subclass whose ``getstate`` raises)."""
    try:
        return rng_state(r)
    except Exception:
        return None


def live_rngs(frozen: bool = True) -> list[Any]:
    """Every Python-level random generator alive in the process (``_rng_types``; ``random.SystemRandom`` left
    out, it has no state): the objects the garbage collector tracks (``gc.get_objects()``) whose type is one of them
    (by ``type()``: a proxy's ``__class__`` is not asked), and the ``random`` module's and NumPy's global
    generators. Found by type, not by reachability from a model (session 19, a second reviewer: a generator kept as
    a class attribute of a plain helper object, in a ``__slots__`` object, in a ``collections.deque``, past 64 list
    items, or on an ``nn.Module`` outside the tree used through a method was not reached by ``draw_sources``, and
    the model was captured while 4-8 of 20 calls differed from eager).

    After ``gc.freeze()`` (``gc.get_freeze_count() > 0``; a pre-forking server's step) the frozen objects are not in
    ``gc.get_objects()``: they are found by a walk along ``gc.get_referents`` from every tracked object, the loaded
    modules and the threads' frames (``_frozen_rngs``; session 20: a frozen generator was missed, 64 of 120 calls
    wrong). The permanent generation is left as it is (no ``gc.unfreeze()``: freezing again would move every younger
    object into it too, never collected after).

    Not found: a bare ``_random.Random`` (not tracked by the collector) outside a frozen process (``capture``
    runs the forward once more where the model reaches a generator the watch does not hold: review21 finding 3;
    the capture leaves such a generator moved by its forwards: not put back);
    ``draw_sources`` still reaches those along the model's attributes. Costs one pass over the tracked objects:
    33-50 ms in a process with torch and torchvision imported and a resnet18 built (~305k objects; session 19,
    ``docs/results/models/session19``); with frozen objects, the walk (``docs/results/usermodels/session20``).
    ``frozen=False``: no walk (the generators made since a watch began, ``DrawWatch.refresh``, are not frozen)."""
    rngs = _rng_types()
    objects = gc.get_objects()
    classes = _rng_classes(rngs)
    found = {id(o): o for o in itertools.compress(objects, map(classes.__contains__, map(type, objects)))}
    if frozen and gc.get_freeze_count():
        _frozen_rngs(objects, rngs, found)
    del objects
    for g in _global_rngs():
        if g is not None:
            found.setdefault(id(g), g)
    return list(found.values())


def _rng_classes(rngs: tuple[type, ...]) -> set[type]:
    """Every generator class alive: ``rngs`` and their subclasses (``type.__subclasses__``, recursively: a class
    with a live instance is alive), less ``random.SystemRandom`` and its subclasses (no state). ``live_rngs`` tests
    each object's ``type()`` against this set in C (``map``/``itertools.compress``), not by ``issubclass`` per
    object in Python."""
    out: set[type] = set()
    todo = list(rngs)
    while todo:
        t = todo.pop()
        if t in out or issubclass(t, random.SystemRandom):
            continue
        out.add(t)
        with contextlib.suppress(TypeError):  # ``type.__subclasses__`` unbound on an odd metaclass
            todo.extend(t.__subclasses__())
    return out


_HEAPTYPE = 1 << 9
"""``Py_TPFLAGS_HEAPTYPE``: a class made at run time (by a ``class`` statement, or an extension's type spec)."""

_CPYTHON_MODULES = frozenset({"builtins", *sys.stdlib_module_names})
"""Modules whose compiled types are CPython's own (the interpreter's and its standard library's)."""


def _tp_traverse_reader() -> tuple[Callable[[type], int] | None, int]:
    """(read a type's ``tp_traverse`` address, ``subtype_traverse``'s address), or (None, 0) where this
    interpreter's type layout is not the one read here (a free-threaded or ``Py_TRACE_REFS`` build, another
    implementation): checked on types whose answers are known."""
    import ctypes

    if (sys.implementation.name != "cpython" or sysconfig.get_config_var("Py_GIL_DISABLED")
            or hasattr(sys, "getobjects")):
        return None, 0
    # PyVarObject's header, then tp_name .. tp_doc (20 slots of pointer size), then tp_traverse
    offset = 3 * ctypes.sizeof(ctypes.c_void_p) + 20 * ctypes.sizeof(ctypes.c_void_p)

    def read(t: type) -> int:
        return ctypes.c_void_p.from_address(id(t) + offset).value or 0

    class _A:
        pass

    class _B:
        __slots__ = ("x",)

    sub = read(_A)
    ok = (sub != 0 and read(_B) == sub and read(int) == 0 and read(object) == 0
          and read(dict) not in (0, sub) and read(list) not in (0, sub, read(dict)))
    return (read, sub) if ok else (None, 0)


_READ_TRAVERSE, _SUBTYPE_TRAVERSE = _tp_traverse_reader()
_TYPE_MODULE = type.__dict__["__module__"]


def _cpython_type(b: type) -> bool:
    """``b`` is a compiled type of the interpreter or its standard library, by its module (read with ``type``'s own
    descriptor: a class's ``__module__`` attribute may be anything)."""
    m = _TYPE_MODULE.__get__(b, type)
    return isinstance(m, str) and m.partition(".")[0] in _CPYTHON_MODULES


def _cpython_traversal(t: type, cache: dict[type, bool]) -> bool:
    """Whether ``gc.get_referents`` on an instance of ``t`` runs CPython's own code only: the traversal that runs
    is ``t``'s, or, for a class written in Python (``subtype_traverse``: its ``__dict__`` and slots, then its base's
    traversal), the first compiled base's along ``__base__``; it must be one of the interpreter's or its standard
    library's types (``_CPYTHON_MODULES``: ``dict``, ``type``, ``collections.OrderedDict``, ``_thread._local``...) or
    none (``object``). A tensor (``nn.Parameter``), a NumPy array or generator, a Cython or pybind11 object is not:
    its extension's traversal is never called by ``_frozen_rngs`` (their instance ``__dict__`` is read instead,
    ``_instance_dict``). Where the type layout cannot be read (``_tp_traverse_reader``), every compiled class in
    ``t``'s MRO must be one of CPython's."""
    ok = cache.get(t)
    if ok is None:
        if _READ_TRAVERSE is None:
            ok = all(_cpython_type(b) for b in t.__mro__ if not b.__flags__ & _HEAPTYPE)
        else:
            b: type | None = t
            while b is not None and _READ_TRAVERSE(b) == _SUBTYPE_TRAVERSE:
                b = b.__base__
            ok = b is None or _READ_TRAVERSE(b) == 0 or _cpython_type(b)
        cache[t] = ok
    return ok


def _dict_descriptor(t: type) -> Any:
    """The standard ``__dict__`` descriptor of ``t``'s instances (a ``getset_descriptor``: C code, no property of
    the user's), or None (no instance dict, or another kind of ``__dict__``)."""
    for b in t.__mro__:
        d = vars(b).get("__dict__")
        if d is not None:
            return d if type(d) is types.GetSetDescriptorType else None
    return None


def _instance_dict(o: Any, descriptor: Any) -> dict | None:
    """``o``'s attribute dict through ``descriptor`` (``_dict_descriptor`` of its type), or None: how a generator
    kept as an attribute of a tensor or of an extension's object is found without calling its type's traversal."""
    if descriptor is None:
        return None
    with contextlib.suppress(Exception):
        v = descriptor.__get__(o, type(o))
        return v if type(v) is dict else None
    return None


def _frozen_rngs(objects: list[Any], rngs: tuple[type, ...], found: dict[int, Any]) -> None:
    """Add to ``found`` the generators reached from ``objects`` (the tracked objects outside the permanent
    generation), ``sys.modules`` and the locals of every thread's frames: those ``gc.freeze()`` moved out of
    ``gc.get_objects()``'s sight. Reads only (a reference count is touched, as by ``gc.get_objects``).

    ``objects`` are walked into as the collector walks them (``gc.get_referents``: their own traversal, which
    each collection calls). What they lead to is walked into only where its traversal is CPython's own code
    (``_cpython_traversal``: the interpreter's and its standard library's types, and classes written in Python over
    them), else only its attribute dict (``_instance_dict``): a frozen object's traversal is never called by the
    collector after ``gc.freeze()``, and an extension's may not hold then. Session 29 (Python 3.12, torch 2.11, a
    GPU machine): walking every frozen object's referents segfaulted a test process at a client's construction
    (which object's traversal was not established). So a generator reachable only through an extension object's
    C-level fields (a Cython ``cdef`` attribute, a tensor's autograd graph), or a suspended generator function's
    locals, is not found here (``draw_sources`` still reaches those along the model's attributes)."""
    seen: set[int] = {id(o) for o in objects}
    classes: dict[type, bool] = {}
    descriptors: dict[type, Any] = {}
    extra: list[dict] = []

    def walkable(o: Any) -> bool:
        """Whether to take ``o``'s referents (``_cpython_traversal``); for an object whose traversal is an extension's,
        its attribute dict goes on the walk instead (``_instance_dict``)."""
        t = type(o)
        if _cpython_traversal(t, classes):
            return True
        if t not in descriptors:
            descriptors[t] = _dict_descriptor(t)
        d = _instance_dict(o, descriptors[t])
        if d is not None and id(d) not in seen:
            seen.add(id(d))
            extra.append(d)
        return False

    roots: list[Any] = [sys.modules, *vars(sys).values()]
    for f in sys._current_frames().values():  # the frames' locals, not the frames (a running frame's referents)
        while f is not None:
            with contextlib.suppress(Exception):
                roots.extend(f.f_locals.values())
            f = f.f_back
    frontier: list[Any] = []
    for o in roots:
        if id(o) in seen:
            continue
        seen.add(id(o))
        t = type(o)
        if issubclass(t, rngs) and not issubclass(t, random.SystemRandom):
            found.setdefault(id(o), o)
        if gc.is_tracked(o) and walkable(o):
            frontier.append(o)
    frontier.extend(objects)
    frontier.extend(extra)
    extra.clear()
    keep = list(frontier)  # alive while walked: an id is not reused by another object meanwhile
    step = 4096
    while frontier:
        nxt = []
        for i in range(0, len(frontier), step):
            for o in gc.get_referents(*frontier[i:i + step]):
                if id(o) in seen:
                    continue
                t = type(o)
                if issubclass(t, rngs) and not issubclass(t, random.SystemRandom):
                    found.setdefault(id(o), o)
                if gc.is_tracked(o) and walkable(o):
                    seen.add(id(o))
                    nxt.append(o)
        nxt.extend(extra)
        extra.clear()
        keep.extend(nxt)
        frontier = nxt
    del keep


MIN_CONTROL_S = 0.25
"""The shortest control interval ``DrawWatch.judge`` waits (seconds): at least this long, and as long as the
forward took; it ends as soon as every generator the forward moved has moved again (only a generator that does not
move again, the forward's own, costs the whole interval: a refusal). Runs only where a generator moved with no
draw from it seen on this thread. 0.25 s (session 19: 0.05 s): an application thread drawing every 100 ms while a
deterministic model is captured moves again within it (session 20, ``p2_restore_rewinds``: refused with 0.05 s once
this thread's ``random.Random`` draws were no longer taken as proof of another thread's)."""

MAX_CONTROL_S = 1.0
"""The longest control interval (seconds): a forward longer than this is compared with this much time."""


def _held_by(r: Any, ours: tuple = ()) -> str:
    """Where a generator the model's attributes do not reach is kept, for a refusal's message, from the objects
    that refer to it (``gc.get_referrers``, one pass over the tracked objects per level, on a refusal only): ``held
    by Cfg.rng`` (an instance's or a class's attribute, a ``__slots__`` field, a module global), ``held in a
    deque``; else ``not reached along the model's attributes``. ``ours``: the caller's own lists that hold it (not
    named); tuples are not named (capture's own records hold generators in tuples)."""
    skip = {id(o) for o in ours}
    with contextlib.suppress(Exception):  # a referrer whose attributes raise: the plain wording
        for ref in gc.get_referrers(r):
            if id(ref) in skip:
                continue
            if isinstance(ref, dict):
                key = next((k for k, v in ref.items() if v is r), None)
                if not isinstance(key, str):
                    continue
                for owner in gc.get_referrers(ref):
                    if isinstance(owner, type) and vars(owner).get(key) is r:
                        return f"held by the class attribute {owner.__qualname__}.{key}"
                    if isinstance(owner, types.ModuleType) and vars(owner) is ref:
                        return f"held by the global {key} (module {owner.__name__})"
                    if getattr(owner, "__dict__", None) is ref:
                        return f"held by {type(owner).__qualname__}.{key}"
            elif isinstance(ref, list | set | frozenset | collections.deque):
                return f"held in a {type(ref).__name__}"
            else:
                for slot in getattr(type(ref), "__slots__", ()):
                    if getattr(ref, slot, None) is r:
                        return f"held by {type(ref).__qualname__}.{slot}"
    return "not reached along the model's attributes"


def _without_bit_generators(gens: list[Any]) -> list[Any]:
    """``gens`` less the bit generators of the ``Generator`` / ``RandomState`` objects among them (one draw moves
    both: the one the user holds is named)."""
    owners = {id(getattr(r, "bit_generator", getattr(r, "_bit_generator", None))) for r in gens}
    return [r for r in gens if id(r) not in owners]


def _compact(r: Any) -> tuple[Any, int]:
    """(the state of the generator ``r`` in the form ``_set_state`` takes back, kept small; its digest). A
    ``random.Random``'s 624 Mersenne words are kept as an ``array('I')`` (2.5 KB, not a tuple of 625 Python ints:
    ~20 KB); the digest is ``hash`` of ``rng_state`` (64 bits; a draw changes it). Raises what reading the state
    raises (a user's subclass whose ``getstate`` fails)."""
    if isinstance(r, _random.Random):
        st = r.getstate()
        digest = _digest(st)
        with contextlib.suppress(TypeError, ValueError, OverflowError, IndexError):
            if isinstance(st, tuple) and len(st) == 3 and isinstance(st[1], tuple):
                return (st[0], array.array("I", st[1]), st[2]), digest
        return st, digest
    return _raw_state(r), _digest(rng_state(r))


def _expand(r: Any, raw: Any) -> Any:
    """``_compact``'s state back in the form the generator's setter takes."""
    if isinstance(r, _random.Random) and isinstance(raw, tuple) and len(raw) == 3 and isinstance(raw[1], array.array):
        return raw[0], tuple(raw[1]), raw[2]
    return raw


def _digest(state: Any) -> int:
    """``hash(state)``; for a state ``hash`` refuses (a user's subclass whose ``getstate`` returns a list or a dict),
    the hash of its pickle, else of its ``repr``: a state that changes gives another digest either way."""
    try:
        return hash(state)
    except TypeError:
        pass
    try:
        return hash(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return hash(repr(state))


def digest_or_none(r: Any) -> int | None:
    """``hash(rng_state(r))``, or None where the state cannot be read (a user's subclass whose ``getstate``
    raises); ~10-30 us, nothing kept."""
    try:
        return _digest(rng_state(r))
    except Exception:
        return None


class DrawWatch:
    """The states of the process's live random generators (``live_rngs``) across one capture: which generators one
    call of the user's forward moves (``judge``: a forward whose Python or NumPy draws the graph would freeze), and
    the states before the capture, put back after it for the generators the capture's own forwards drew from
    (``restore``: capture's own eager runs, the export's trace and the check, moved the user's generator 3 draws
    ahead, session 19). States are compared by digest (``digest_or_none``) and kept whole once, at the start, in a
    compact form (``_compact``; session 20: 20,000 ``random.Random`` cost 6.2 s and 2.3 GiB per capture).

    Who moved a generator: a draw this thread made from a ``random.Random`` while the forward ran is seen by
    ``traced_reads``' profile function (``Drawn``; NumPy's are not): by the user's code, the forward's own
    (refused); by torch, a package torch requires or the standard library only (a compiled module's compiler
    naming temporary files, ``tempfile``), not the forward's values (neither refused nor put back), unless the
    generator is one of the two global ones users draw from (``random.random``, ``np.random.rand``): those are
    judged as below. A generator that moved with no draw seen on this thread (any NumPy generator; the forward
    drew on a worker thread; under ``cProfile``) is judged by a control interval right after the forward, as long
    as it took (at least ``MIN_CONTROL_S``, at most ``MAX_CONTROL_S``; polled every millisecond, the thread
    sleeping between polls), in which this thread does not call the model: one that moves in it too is another
    thread's (an application's data-loading thread calling ``np.random.rand``): whether the forward drew from it
    as well cannot be told from its state, so it is not refused; a WARNING names it. One that does not move again
    is the forward's: refused (session 20: a subclass drawing in Python and a draw on a worker thread had been
    filed as another thread's and captured, 11-25 of 20-60 calls wrong).

    Not detected: the forward's draw on another thread (or with no profile function) from a generator another
    thread draws from during both intervals too; a draw by a library torch requires or by the standard library on
    the forward's behalf that reaches its values (none known). A draw by another thread in the forward's interval
    only (none in the control interval) is taken for the forward's and refused (a false refusal, not a wrong
    answer)."""

    def __init__(self) -> None:
        self.gens = live_rngs()
        self.ids = {id(g) for g in self.gens}
        """ids of ``gens`` (alive while watched: no other object takes one)."""
        self.start: list[tuple[Any, int] | None] = []
        for r in self.gens:
            try:
                self.start.append(_compact(r))
            except Exception:  # a user's subclass whose state cannot be read: neither compared nor restored
                self.start.append(None)
        self.shared: set[int] = set()
        """ids of the generators seen moving in a control interval (another thread's)."""
        self.ours: set[int] = set()
        """ids of the generators the user's code drew from on this thread while capture's forwards ran (``Drawn``),
        and those ``judge`` found the forward's by the control interval: put back by ``restore``."""
        self.reached: Any = None
        """A function giving the ids of the generators the model reaches (``draw_sources``), set by the caller once
        the forward ran: a NumPy one among them is put back too (NumPy's draws call no C function the profile
        function sees: a ``RandomState`` seeded again in every call is moved by the export only)."""
        self.refusal: str | None = None
        """The refusal ``judge`` found (the first), or None."""
        self.refreshed = False
        self.consumed: dict[int, tuple[Any, str]] = {}
        """``Drawn.consumed`` of capture's check forwards: the lengths and next values the user's code used as values
        (``capture._forward_writes`` refuses such a place that only grows or counts)."""
        self.sources: tuple[Any, list[tuple[str, Any]]] | None = None
        """(the ``ForwardReads``, ``draw_sources``' answer for it): the model walked once per capture (session 20
        walked it up to 3 times: the draw check, a disagreement's message, ``restore``)."""

    def refresh(self) -> None:
        """Watch the generators made since the watch began too (one ``functools.lru_cache``d on the forward's first
        call, during the export: session 20, captured while 32 of 60 calls differed): judged from now on; not put
        back (no state from before the capture). Once per watch (a heap scan, ~30-50 ms: session 20 scanned before
        each of up to 3 eager checks): a generator first made in a check's forward is made from OS entropy
        (``Drawn.entropy``: refused) or from a seed (``Drawn.seeds``: a second call that draws on from it differs)."""
        if self.refreshed:
            return
        self.refreshed = True
        for r in live_rngs(frozen=False):
            if id(r) not in self.ids:
                self.ids.add(id(r))
                self.gens.append(r)
                self.start.append(None)

    def holds(self, r: Any) -> bool:
        """Whether ``r`` is among the generators watched."""
        return id(r) in self.ids

    def fresh(self, drawn: Drawn) -> list[tuple[str, int | None]]:
        """(where, digest) of ``drawn.seeds`` less those of the generators watched (their draws are ``judge``'s):
        the seeds given and the states held by generators made during the forward."""
        return [(where, d) for where, i, d in drawn.seeds if i not in self.ids]

    def states(self) -> list[int | None]:
        """The digest (``digest_or_none``) of every watched generator's state (None where it cannot be read)."""
        return [digest_or_none(r) for r in self.gens]

    def judge(self, before: list[Any], after: list[Any], took: float, since: float, drawn: Drawn | None,
              names: Any, label: str) -> str | None:
        """The refusal for the generators one call of the forward moved (``before`` -> ``after``: ``states()``
        around a forward that took ``took`` seconds and ended at ``time.perf_counter()`` == ``since``; ``drawn``:
        this thread's draws in it, ``traced_reads``), or None. A generator the user's code drew from is the
        forward's; one only a library drew from is not (unless a global one); any other moved one waits out the
        control interval: those that move in it too are another thread's (``shared``; a WARNING), the others are
        the forward's. ``names()`` gives {id: where} of the generators the model reaches (``draw_sources``), for the
        message; others are named by their class and holder. Sets ``refusal`` on the first refusal."""
        drawn = drawn or Drawn()
        self.ours |= drawn.user
        moved = [i for i, (b, a) in enumerate(zip(before, after)) if b is not None and a != b]
        if not moved:
            return None
        public = {id(g) for g in _global_rngs() if g is not None}
        owner = {}  # a NumPy bit generator's id -> its Generator's / RandomState's (drawn through it)
        for i in moved:
            bit = getattr(self.gens[i], "bit_generator", getattr(self.gens[i], "_bit_generator", None))
            if bit is not None:
                owner[id(bit)] = id(self.gens[i])
        own: list[Any] = []
        other: list[Any] = []
        still = []
        reach: set[int] | None = None
        for i in moved:
            r = self.gens[i]
            key = owner.get(id(r), id(r))
            if key in drawn.user:  # this thread's user code drew from it: the forward's own draw
                own.append(r)
            elif key in drawn.lib and key not in public:  # a library's own generator (tempfile's, sympy's)
                if reach is None:
                    reach = set(names())
                if _name_only(r) or (key not in reach and id(r) not in reach):
                    continue
                still.append(i)
            else:
                still.append(i)
        deadline = since + min(max(took, MIN_CONTROL_S), MAX_CONTROL_S)
        while still:  # the control interval, polled: a generator seen moving in it is another thread's at once
            for i in [i for i in still if digest_or_none(self.gens[i]) != after[i]]:
                still.remove(i)
                self.shared.add(id(self.gens[i]))
                other.append(self.gens[i])
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            time.sleep(min(left, 0.001))
        own.extend(self.gens[i] for i in still)
        self.ours.update(id(r) for r in own)
        for r in _without_bit_generators(other):
            log.warning("%s: the %s moved while the forward ran and also while it did not (another thread draws from "
                        "it): a draw from it in the forward cannot be told apart and is not refused", label,
                        _rng_kind(r))
        own = _without_bit_generators(own)
        if not own:
            return None
        where = names()
        found = [where.get(id(r)) or f"a {_rng_kind(r)} {_held_by(r, (self.gens, own, other, still, moved))}"
                 for r in own]
        self.refusal = self.refusal or (
            f"{label} draws random numbers in Python ({'; '.join(found[:3])}) in forward: the graph keeps the value "
            "drawn while torch.export traced it, eager draws anew on every call (the generator's state moved in one "
            "call of the forward); pass the draw as an input (or drop it at inference)")
        return self.refusal

    def restore(self, label: str) -> None:
        """Put back the state each generator had when the watch began, where it changed since, for those the
        capture's forwards drew from (``ours``) and the NumPy ones the model reaches (``reached``; not NumPy's
        global ``RandomState``), unless another thread draws from it too (``shared``). Nothing else is put back
        (session 20: an application thread drawing every 100 ms from the global generators repeated values after 3
        captures). A generator whose state cannot be set is left as it is (logged at DEBUG)."""
        public = _global_rngs()[1]
        reached: set[int] | None = None
        for r, s in zip(self.gens, self.start):
            if s is None or id(r) in self.shared:
                continue
            if id(r) not in self.ours:
                if isinstance(r, _random.Random) or r is public or self.reached is None:
                    continue
                if reached is None:
                    try:
                        reached = set(self.reached())
                    except Exception as e:  # the walk failed: nothing more is put back
                        log.debug("%s: the generators the model reaches could not be listed: %s", label, e)
                        reached = set()
                if id(r) not in reached:
                    continue
            if digest_or_none(r) == s[1]:  # read last: only the few that may be put back cost a state read
                continue
            try:
                _set_state(r, _expand(r, s[0]))
            except Exception as e:
                log.debug("%s: the state of a %s could not be put back: %s", label, _rng_kind(r), e)


MAX_RNG_VISITS = 5_000
"""Objects ``draw_sources`` looks at past the modules' attribute tables (a bound on the walk)."""


def draw_sources(mods: list[tuple[str, torch.nn.Module]], reads: ForwardReads, label: str) -> list[tuple[str, Any]]:
    """(where, generator) of every Python-level random generator (``_rng_types``) a forward could draw from:
    ``reads.draws`` (what its code reached while it ran: ``traced_reads``) and those reachable from the modules
    ``mods`` (each submodule's attributes, its hooks, the class attributes of its user classes) and from the module
    globals the code loaded (``reads.globals``), through lists, tuples, dicts, sets, plain objects' fields,
    bound methods, ``functools.partial`` and functions' closures and defaults, at most 4 deep and
    ``MAX_RNG_VISITS`` objects. One entry per generator.

    Not found, so not refused: a generator reached only through a C extension's or torch's own state, through a
    name the code built at run time (``getattr(self, name)``) past these paths, one made anew inside the forward
    from OS entropy (``np.random.default_rng()`` without a seed: no state exists before the call) and
    ``random.SystemRandom`` (no state): those are refused as entropy reads (``Drawn.entropy``). Not wrong when
    found: one seeded again in every call (``rng.seed(0)``, ``random.Random(0)`` made in forward) comes back to the
    same state and is not refused by ``capture``."""
    rngs = _rng_types()
    found: dict[int, tuple[str, Any]] = {}
    seen: set[int] = set()
    left = [MAX_RNG_VISITS]

    def walk(v: Any, where: str, depth: int) -> None:
        with contextlib.suppress(Exception):  # a user object whose attribute access or ``repr`` raises: not walked
            step(v, where, depth)

    def step(v: Any, where: str, depth: int) -> None:
        if left[0] <= 0 or v is None or isinstance(v, (*SCALARS, torch.Tensor, types.ModuleType)):
            return
        r = _as_rng(v, rngs)
        if r is not None:
            found.setdefault(id(r), (f"{where}, a {_rng_kind(r)}", r))
            return
        if id(v) in seen or depth > MAX_REACH_DEPTH or isinstance(v, torch.nn.Module | type) or (
                isinstance(v, list | tuple | set | frozenset | dict) and not v):
            return
        seen.add(id(v))
        left[0] -= 1
        d = depth + 1
        if isinstance(v, list | tuple | set | frozenset):
            for i, x in enumerate(itertools.islice(v, MAX_ITEMS)):
                walk(x, f"{where}[{i}]", d)
        elif isinstance(v, dict):
            for k, x in list(itertools.islice(v.items(), MAX_ITEMS)):
                walk(x, f"{where}[{k!r}]", d)
        elif isinstance(v, functools.partial):
            walk((v.func, v.args, v.keywords), where, d)
        elif isinstance(v, types.FunctionType):
            for n, cell in zip(v.__code__.co_freevars, v.__closure__ or ()):
                with contextlib.suppress(ValueError):  # an empty cell
                    walk(cell.cell_contents, f"{n} in {v.__qualname__}'s closure", d)
            code = v.__code__
            pos = code.co_varnames[:code.co_argcount]
            defaults = v.__defaults__ or ()
            for n, x in [*zip(pos[len(pos) - len(defaults):], defaults), *(v.__kwdefaults__ or {}).items()]:
                walk(x, f"the default {n}= of {v.__qualname__}", d)
        elif isinstance(v, types.MethodType):
            walk(v.__func__, where, d)
            walk(v.__self__, f"{where}.__self__", d)
        elif not isinstance(v, _CODE_LIKE) and isinstance(getattr(v, "__dict__", None), dict):
            for k, x in list(itertools.islice(vars(v).items(), MAX_ITEMS)):
                walk(x, f"{where}.{k}", d)

    classes: dict[type, None] = {}
    for path, m in mods:
        at = f"{label}.{path}" if path else label
        for k, v in vars(m).items():
            if k not in MODULE_INTERNALS:
                walk(v, f"{at}.{k}", 0)
            elif k in _HOOK_TABLES:
                walk(v, f"a hook of {at}", 0)
        classes.update(dict.fromkeys(c for c in type(m).__mro__ if _user_class(c)))
    for c in classes:  # class attributes (``rng = np.random.default_rng()`` in the class body), methods' defaults
        for k, v in vars(c).items():
            if not k.startswith("__"):
                walk(v, f"{c.__qualname__}.{k}", 1)
    for table in _GLOBAL_HOOK_TABLES:
        walk(getattr(torch.nn.modules.module, table, None), "a global module hook", 0)
    for g, n in reads.globals:
        walk(g.get(n), f"the global {n} (module {g.get('__name__', '?')})", 0)
    for where, r in reads.draws:  # named by where the code reached it when no path above did
        found.setdefault(id(r), (where, r))
    return list(found.values())


_USER, _CALL, _OTHER = 0, 1, 2
_CALL_CODES = frozenset(c.__code__ for c in (torch.nn.Module._wrapped_call_impl, torch.nn.Module._call_impl))
_NOT_USER = tuple(os.path.normcase(os.path.dirname(p)) + os.sep for p in (torch.__file__, __file__))
_STDLIB = tuple(os.path.normcase(p) + os.sep for p in {sysconfig.get_paths()["stdlib"],
                                                       sysconfig.get_paths()["platstdlib"]})


def _site_dirs() -> tuple[str, ...]:
    """Every site-packages directory (normcased, ending in the separator), longest first: sysconfig's purelib and
    platlib, ``site.getsitepackages()`` (a venv's own and, made with ``--system-site-packages``, the base
    interpreter's), ``site.getusersitepackages()``, the ``site-packages`` / ``dist-packages`` directories under the
    standard library's directories, and ``sys.path`` entries inside one (review20b finding 4: the base interpreter's
    site-packages were classed as the standard library, a user's model there was not refused, 11/30 calls wrong)."""
    import site
    found = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with contextlib.suppress(Exception):
        found.update(site.getsitepackages())
    with contextlib.suppress(Exception):
        found.add(site.getusersitepackages())
    for lib in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}:
        found.update(os.path.join(lib, d) for d in ("site-packages", "dist-packages"))
    for p in sys.path:
        parts = os.path.normcase(p).split(os.sep)
        for d in ("site-packages", "dist-packages"):
            if d in parts:
                found.add(os.sep.join(parts[:parts.index(d) + 1]))
    return tuple(sorted({os.path.normcase(os.path.abspath(p)).rstrip(os.sep) + os.sep for p in found if p},
                        key=len, reverse=True))


_SITE = _site_dirs()


def _code_kind(code: types.CodeType) -> int:
    """``_CALL``: ``nn.Module``'s call; ``_OTHER``: torch's, the standard library's or ``modelgraph``'s own code;
    ``_USER``: any other (the user's modules, torchvision, timm, transformers, code made by ``exec``)."""
    if code in _CALL_CODES:
        return _CALL
    f = os.path.normcase(code.co_filename)
    if f.startswith(_NOT_USER) or (f.startswith(_STDLIB) and not f.startswith(_SITE)):
        return _OTHER
    return _USER


def _module_rngs(mod: types.ModuleType, names: tuple[str, ...], rngs: tuple[type, ...], depth: int,
                 found: dict[int, tuple[str, Any]], via: str) -> None:
    """The generators reached from module ``mod`` along the attribute names ``names`` a code object used
    (``np.random.rand``: ``np`` -> ``numpy.random`` -> its global ``RandomState``), at most ``depth`` modules deep;
    a module's ``__dict__`` and the submodules already imported only (no module ``__getattr__`` runs)."""
    for n in names:
        v = vars(mod).get(n, _ABSENT)
        if v is _ABSENT:
            v = sys.modules.get(f"{mod.__name__}.{n}")  # ``np.random``: numpy 2 loads it through __getattr__
        r = _as_rng(v, rngs)
        if r is not None:
            found.setdefault(id(r), (f"the {_rng_kind(r)}, through the global {via}", r))
        elif isinstance(v, types.ModuleType) and depth > 1:
            _module_rngs(v, names, rngs, depth - 1, found, via)


def _code_reads(called: dict[types.CodeType, dict],
                draws: dict[int, tuple[str, Any]] | None = None) -> dict[str, Any]:
    """``ForwardReads``' ``names``, ``globals``, ``called`` and ``draws`` of the user code a forward ran (code -> its
    globals; ``draws``: the generators the profile function saw, id -> (where, generator)). NumPy's samplers are
    Cython methods, which send the profile function no event: the generators reached from a global module along the
    code's attribute names (``_module_rngs``) are added, and those in the globals it loaded are found by
    ``draw_sources``."""
    names: set[str] = set()
    loads: dict[tuple[int, str], tuple[dict, str]] = {}
    seen_calling, draws = draws or {}, {}
    rngs = _rng_types()
    for code, g in called.items():
        names.update(code.co_names)
        names.update(c for c in code.co_consts if isinstance(c, str) and c.isidentifier())
        for ins in dis.get_instructions(code):
            if ins.opname == "LOAD_GLOBAL" and isinstance(ins.argval, str):
                v = g.get(ins.argval, _ABSENT)
                if isinstance(v, types.ModuleType):
                    _module_rngs(v, code.co_names, rngs, 3, draws, ins.argval)
                elif v is not _ABSENT:
                    loads.setdefault((id(g), ins.argval), (g, ins.argval))
    for k, v in seen_calling.items():  # named by the module path where there is one
        draws.setdefault(k, v)
    return {"names": frozenset(names), "globals": tuple(loads.values()), "called": frozenset(called),
            "draws": tuple(draws.values())}


def _name_outside(mods: list[tuple[str, torch.nn.Module]],
                  outside: list[torch.nn.Module]) -> list[tuple[str, torch.nn.Module]]:
    """(a name, module) of each module called outside the tree: where a submodule keeps it (an attribute, an item
    of a list, tuple or dict attribute), its children under it; else ``<outside: Class #i>``."""
    where: dict[int, str] = {}
    for path, m in mods:
        for k, v in vars(m).items():
            if k in MODULE_INTERNALS:
                continue
            text = f"{path}.{k}" if path else k
            items = (v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list | tuple) else ())
            where.setdefault(id(v), text)
            for j, x in items:
                where.setdefault(id(x), f"{text}[{j!r}]")
    out: list[tuple[str, torch.nn.Module]] = []
    done: set[int] = set()
    for i, m in enumerate(outside):
        if id(m) in done:
            continue
        root = where.get(id(m), f"<outside: {type(m).__name__} #{i}>")
        for sub_path, sub in m.named_modules(remove_duplicate=False):
            if id(sub) not in done:
                done.add(id(sub))
                out.append((f"{root}.{sub_path}" if sub_path else root, sub))
    return out


def _compiled(m: torch.nn.Module) -> bool:
    """A ``torch.compile``d module (``OptimizedModule``, or ``module.compile()``): dynamo would trace through the
    tracer's ``__getattribute__`` and recompile the user's frame up to its recompile limit (it then runs eager
    for good), so such a module is not traced and keeps the rules for unknown reads."""
    return type(m).__name__ == "OptimizedModule" or vars(m).get("_compiled_call_impl") is not None


def _sort_reads(mods: list[tuple[str, torch.nn.Module]], seen: dict[int, set[str]],
                set_first: dict[int, set[str]] | None = None) -> ForwardReads:
    scratch = {path: frozenset(n for n in set_first.get(id(m), ()) if n not in MODULE_INTERNALS)
               for path, m in mods} if set_first else {}
    instance: dict[str, frozenset[str]] = {}
    classes: dict[str, frozenset[str]] = {}
    missed: dict[str, frozenset[str]] = {}
    untraced: set[str] = set()
    for path, m in mods:
        mro = type(m).__mro__
        if any("__getattribute__" in vars(c) for c in mro if c not in (torch.nn.Module, object)):
            untraced.add(path)
            scratch.pop(path, None)
            continue
        d = vars(m)
        tables = tuple(t for t in (d.get("_parameters"), d.get("_buffers"), d.get("_modules")) if isinstance(t, dict))
        a: set[str] = set()
        b: set[str] = set()
        c: set[str] = set()
        for n in seen[id(m)]:
            if n in d:
                a.add(n)
            elif any(n in t for t in tables):
                continue
            else:
                owner = next((k for k in mro if n in vars(k)), None)
                if owner is None:
                    c.add(n)
                elif owner not in (torch.nn.Module, object):
                    b.add(n)
        instance[path], classes[path], missed[path] = frozenset(a), frozenset(b), frozenset(c)
    return ForwardReads(instance, classes, missed, frozenset(untraced), {p: n for p, n in scratch.items() if n})


_ABSENT = object()
_PROXY_GET = types.MappingProxyType.get
_BY_IDENTITY = (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                types.WrapperDescriptorType, property, staticmethod, classmethod, type)
"""Class attributes compared by identity alone (``==`` is identity for them)."""


class _ClassReads:
    """The class attributes a forward read through its submodules (``ForwardReads.classes``), each as found in
    the class dicts of the submodule's method resolution order: absent from every class before its owner, the
    same object (and, for a container or tensor, the same snapshot) in the owner. Checked per call in one
    C-level pass over the dicts (deduplicated per class and name), the mutable values by snapshot."""

    def __init__(self, mods: list[tuple[str, torch.nn.Module]], reads: ForwardReads) -> None:
        seen: set[tuple[int, str]] = set()
        self.quick: list[tuple[Any, str, Any, str, type]] = []
        """(class dict, name, the object at capture or ``_ABSENT``, submodule path, class)."""
        self.slow: list[tuple[Any, str, Any, Any, str, type]] = []
        """(class dict, name, object, its snapshot, submodule path, class): containers, tensors, other objects."""
        for path, m in mods:
            for n in sorted(reads.classes.get(path, ())):
                for k in type(m).__mro__:
                    d = k.__dict__
                    if (id(k), n) in seen:
                        if n in d:
                            break
                        continue
                    seen.add((id(k), n))
                    if n not in d:
                        self.quick.append((d, n, _ABSENT, path, k))
                        continue
                    v = d[n]
                    if _immutable(v) or isinstance(v, _BY_IDENTITY):
                        self.quick.append((d, n, v, path, k))
                    else:
                        self.slow.append((d, n, v, snapshot(v, MAX_READ_ITEMS), path, k))
                    break
        self._cols = ([q[0] for q in self.quick], [q[1] for q in self.quick], [_ABSENT] * len(self.quick),
                      [q[2] for q in self.quick])

    def unchanged(self, project: Any) -> bool:
        ds, ns, absent, expected = self._cols
        try:
            same = list(map(_PROXY_GET, ds, ns, absent)) == expected
        except (RuntimeError, ValueError, TypeError):  # a value replaced by one whose == is not a bool (a tensor)
            return False
        return same and (not self.slow or self._slow_change(project) is None)

    def _slow_change(self, project: Any) -> tuple[str, str, str] | None:
        for d, n, v, snap, path, k in self.slow:
            now = d.get(n, _ABSENT)
            if now is not v:
                return path, n, f"the class attribute {k.__name__}.{n} was replaced"
            if snap is not _UNWATCHED:
                old, new = project(snap), project(snapshot(now, MAX_READ_ITEMS))
                if old != new:
                    return path, n, f"the class attribute {k.__name__}.{n} changed ({_show(old)} -> {_show(new)})"
        return None

    def changed(self, project: Any) -> tuple[str, str, str] | None:
        """(submodule path, name, what) of the first change, or None."""
        for d, n, v, path, k in self.quick:
            now = d.get(n, _ABSENT)
            if now is v or (v is not _ABSENT and now is not _ABSENT and _immutable(v) and now == v):
                continue
            if v is _ABSENT:
                return path, n, f"the class attribute {n} set on {k.__name__} after capture ({_show(snapshot(now))})"
            if now is _ABSENT:
                return path, n, f"the class attribute {k.__name__}.{n} deleted after capture"
            return path, n, f"the class attribute {k.__name__}.{n} changed ({_show(snapshot(v))} -> " \
                            f"{_show(snapshot(now))})"
        return self._slow_change(project)


MAX_REACHED = 20_000
"""Slots ``_Reached`` watches at most (a global, a closure's variable, a field of a plain object, ...)."""
MAX_REACH_DEPTH = 4
_D, _P, _C, _A, _L, _K, _Q, _I = range(8)
"""``_Reached``'s slot kinds: an item of a dict (a ``__dict__``, a module's globals), of a class's dict (a
``mappingproxy``), a closure's cell, an attribute (``__slots__``, a ``functools.partial``'s, a function's defaults),
an item of a list or tuple, a dict's keys or a list's length, an ``lru_cache``'s counters (``cache_info()``), a C
iterator's position (``_iter_state``)."""


def _c_iterator(v: Any) -> bool:
    """An iterator of the interpreter's own (``itertools.count`` / ``cycle``, a list's or a deque's iterator, ``map``,
    ``zip``): its position is no attribute; ``_iter_state`` reads it."""
    return (isinstance(v, Iterator) and not isinstance(v, types.GeneratorType)
            and type(v).__module__ in ("builtins", "itertools", "_collections"))


def _iter_state(v: Any, depth: int = 0) -> Any:
    """A comparable position of a C iterator (``_c_iterator``), from its ``__reduce__`` (what pickling it would
    save: ``count(3)`` -> ``(3,)``, a ``cycle``'s saved items and its source's index), with nested iterators' the
    same way; ``_UNWATCHED`` where it cannot be read (an iterator over a generator; Python 3.14 dropped the
    ``itertools`` objects' ``__reduce__``, 3.12-3.13 warn: silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            red = v.__reduce__()
        except Exception:
            return _UNWATCHED
    if not isinstance(red, tuple):
        return _UNWATCHED
    def part(x: Any) -> Any:
        if _c_iterator(x):
            return _iter_state(x, depth + 1) if depth < MAX_DEPTH else _UNWATCHED
        if type(x) is tuple and any(_c_iterator(y) for y in x):  # ``cycle``'s ``(source,)``
            parts = tuple(part(y) for y in x)
            return _UNWATCHED if any(p is _UNWATCHED for p in parts) else (tuple, parts)
        return snapshot(x, MAX_READ_ITEMS)

    out = tuple(part(x) for x in red[1:])
    return _UNWATCHED if any(p is _UNWATCHED for p in out) else (type(v).__name__, out)


def _library_place(kind: int, c: Any) -> bool:
    """Whether a place ``_Reached`` watches is a class attribute or a module global of a package torch requires
    (``_torch_requires``: sympy, networkx, ...): its own bookkeeping (sympy's ``Dummy._count``), no state of the
    user's model."""
    if kind not in (_D, _P) or not isinstance(c, Mapping | types.MappingProxyType):
        return False
    owner = c.get("__file__") if "__file__" in c else getattr(sys.modules.get(c.get("__module__")), "__file__", None)
    return isinstance(owner, str) and os.path.normcase(owner).startswith(_torch_requires())


def _grew(kind: int, old: Any, new: Any) -> bool:
    """Whether a snapshot (``_Reached.snaps``) only gained entries: a list or deque whose old items are its first
    ones, a dict holding every old item unchanged, a superset; a list's length grown, a dict's keys extended (a hook
    appending each output's shape: a per-call record, ``ForwardReads.written``)."""
    if kind == _K:
        if isinstance(old, int):
            return isinstance(new, int) and new > old
        return isinstance(new, tuple) and len(new) > len(old) and new[:len(old)] == old
    if kind in (_Q, _I):
        return False
    if not (type(old) is tuple and type(new) is tuple and len(old) == len(new) == 2 and old[0] is new[0]
            and isinstance(old[0], type) and isinstance(old[1], tuple | frozenset)):
        return False
    a, b = old[1], new[1]
    if issubclass(old[0], list | collections.deque):
        return len(b) > len(a) and b[:len(a)] == a
    if old[0] is dict:
        da, db = dict(a), dict(b)
        return len(db) > len(da) and all(k in db and db[k] == x for k, x in da.items())
    return old[0] is set and a < b


_STORE_OF = {"LOAD_ATTR": "STORE_ATTR", "LOAD_GLOBAL": "STORE_GLOBAL", "LOAD_NAME": "STORE_NAME",
             "LOAD_DEREF": "STORE_DEREF", "LOAD_CLASSDEREF": "STORE_DEREF"}
_NAMED = frozenset({*_STORE_OF, "LOAD_METHOD", "LOAD_CLOSURE", "LOAD_CONST"})
"""Instructions that name a place by its name (a local of the same name, ``LOAD_FAST``, is another variable)."""


def _augmented_end(ins: list[dis.Instruction], i: int, store: str, name: Any) -> bool:
    """Whether the value loaded at ``ins[i]`` is the left side of an augmented assignment into the place it came
    from: the first store after it is ``store`` (of ``name``; any for ``STORE_SUBSCR``) and the instruction before
    that store (past ``SWAP``s) is an in-place ``BINARY_OP`` (``+=``, ``-=``, ...). Any other store first: no."""
    for k in range(i + 1, len(ins)):
        x = ins[k]
        if not x.opname.startswith("STORE_"):
            continue
        if x.opname != store or (store != "STORE_SUBSCR" and x.argval != name):
            return False
        p = k - 1
        while p > i and ins[p].opname == "SWAP":
            p -= 1
        return ins[p].opname == "BINARY_OP" and ins[p].argrepr.endswith("=") and p > i + 1
    return False


def _subscript_augmented(ins: list[dis.Instruction], i: int) -> bool:
    """``ins[i + 1:]`` is ``[CONST] += ...`` on the container loaded at ``ins[i]`` (``stats["ms"] += dt``)."""
    return (i + 4 < len(ins) and ins[i + 1].opname == "LOAD_CONST" and [x.opname for x in ins[i + 2:i + 5]] ==
            ["COPY", "COPY", "BINARY_SUBSCR"] and _augmented_end(ins, i + 1, "STORE_SUBSCR", None))


def accumulated(name: str, called: Any, container: bool = False) -> bool:
    """Whether the user code the forward ran (``called``: code objects) uses the place named ``name`` only to add to
    it in place: every instruction naming it (an attribute, a global, a closure's variable, a string constant)
    loads the left side of an augmented assignment into the same place (``self.h.calls += 1``, ``global N; N += 1``,
    ``stats["ms"] += dt`` with ``name`` "ms"); with ``container``, ``name`` holds a dict each use of which is
    ``name[CONST] += ...`` (``stats`` there). Such a value flows into itself only: no output depends on it (a log-only
    counter, a timing dict; refused as state in session 21, review21b). False when the name does not occur, or
    occurs any other way (read into a local, passed, compared, formatted, ``getattr(h, "calls")``): the safe
    direction. Python 3.11-3.12 bytecode (``COPY``/``SWAP``); another layout reads as False."""
    seen = False
    codes, todo = set(), list(called)
    while todo:  # with the functions defined in that code (a lambda it keeps may run in a later call)
        code = todo.pop()
        if code not in codes:
            codes.add(code)
            todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    for code in codes:
        ins, _ = _instructions(code)
        for i, x in enumerate(ins):
            if x.opname not in _NAMED or x.argval != name:
                continue
            seen = True
            if container:
                ok = x.opname in _STORE_OF and not x.argrepr.startswith("NULL") and _subscript_augmented(ins, i)
            elif x.opname == "LOAD_CONST":
                ok = [y.opname for y in ins[i + 1:i + 4]] == ["COPY", "COPY", "BINARY_SUBSCR"] and \
                    _augmented_end(ins, i, "STORE_SUBSCR", None)
            elif x.opname == "LOAD_ATTR":
                ok = i > 0 and ins[i - 1].opname == "COPY" and ins[i - 1].arg == 1 and \
                    _augmented_end(ins, i, "STORE_ATTR", name)
            elif x.opname in _STORE_OF:
                ok = not x.argrepr.startswith("NULL") and _augmented_end(ins, i, _STORE_OF[x.opname], name)
            else:  # a method of it called, a closure made over it
                ok = False
            if not ok:
                return False
    return seen


_NAMES_BUILT = frozenset({"setattr", "__setattr__", "delattr", "vars", "globals", "__dict__", "exec", "eval",
                          "__defaults__", "__kwdefaults__", "setdefault", "update"})
"""Names in the code a forward ran that let it store under a name it builds at run time (``setattr(x, name, v)``,
``vars(x)[name] = v``, ``globals().update``): ``_Reached.holds_data`` then runs the extra forward."""


def _stored_names(called: Any) -> frozenset[str]:
    """The names the code objects ``called`` (and the functions defined in them) store to (``STORE_ATTR``,
    ``STORE_GLOBAL``, ``STORE_DEREF``, ``STORE_NAME``, ``DELETE_*``), with their string constants (``setattr(x,
    "n", v)``, ``d["n"] = v``)."""
    out: set[str] = set()
    codes, todo = set(), list(called)
    while todo:
        code = todo.pop()
        if code in codes:
            continue
        codes.add(code)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        out.update(c for c in code.co_consts if isinstance(c, str))
        for ins in _instructions(code)[0]:
            if ins.opname.startswith(("STORE_", "DELETE_")) and ins.opname not in ("STORE_FAST", "DELETE_FAST",
                                                                                     "STORE_SUBSCR", "DELETE_SUBSCR"):
                out.add(ins.argval)
    return frozenset(out)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _user_class(c: Any) -> bool:
    """A class of the user's or a library's (not torch's, not the standard library's, not ``object``)."""
    mod = getattr(c, "__module__", None) or ""
    top = mod.partition(".")[0]
    return isinstance(c, type) and c is not object and top != "torch" and top not in sys.stdlib_module_names


_CODE_LIKE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, property, staticmethod, classmethod,
              type, functools.partial)


def _describe(v: Any) -> str:
    """A short text of a value ``_Reached`` found in a slot."""
    if v is _MISSING:
        return "<unset>"
    if isinstance(v, bytes) and len(v) <= 80:  # an environment variable's value (os.environ._data holds bytes)
        return repr(os.fsdecode(v))
    snap = snapshot(v)
    return _kind(v) if snap is _UNWATCHED else _show(snap)


def _field(what: str, n: str) -> str:
    """The text of field ``n`` of the object ``what`` names (a path, or a phrase)."""
    return f"{what}, its field {n}" if " " in what else f"{what}.{n}"


def _read(kind: int, c: Any, k: Any) -> Any:
    if kind in (_D, _P):
        return c.get(k, _MISSING)
    if kind == _C:
        try:
            return c.cell_contents
        except ValueError:  # an empty cell
            return _MISSING
    if kind == _A:
        return getattr(c, k, _MISSING)
    if kind == _L:
        return c[k] if k < len(c) else _MISSING
    if kind == _Q:
        return tuple(c.cache_info())
    if kind == _I:
        return _iter_state(c)
    return tuple(c) if isinstance(c, dict) else len(c)


class _Reached:
    """What a forward read past its modules' own attributes, found from what the capture's eager check ran
    (``ForwardReads.names``, ``globals``, ``called``; session 16: each was a silently wrong answer on every path
    when changed after the client was built, 1.7-9.3 off ``model(x)``):

    - module globals the user code loaded (``SCALE = 2.0`` rebound; a global list edited);
    - class attributes of the submodules' classes under the names that code used (``type(self).k``,
      ``self.__class__.k``, a descriptor's or a property's class);
    - the variables of each function it ran that closes over them (a hook's ``box[0]``, a property reading an
      enclosing ``cfg``), its defaults, a ``functools.partial``'s function, arguments and keywords, a bound
      method's object;
    - the fields under those names of the plain objects reached so (``self.cfg.scale`` with ``cfg`` a plain
      object, one with ``__slots__``, a descriptor's ``self.v``), nested at most ``MAX_REACH_DEPTH`` deep.

    Each place is a slot: the object it held at capture must stay (identity; an equal number or tuple rebound is
    taken), and a list, dict, set, tensor or configuration object there must keep its snapshot (``snapshot``, up to
    ``MAX_READ_ITEMS`` items). Fields under names the forward's code never used (``cfg.comment``) are not watched;
    a name the code built at run time (``getattr(cfg, name)``) is not seen, nor what torch's own code read (the
    instance tracer sees module attributes), nor state a C extension keeps. Checked per call in C-level passes
    per slot kind; at most ``MAX_REACHED`` slots."""

    def __init__(self, reads: ForwardReads, mods: list[tuple[str, torch.nn.Module]],
                 held: list[tuple[str, dict, str, Any]], hooks: list[tuple[str, dict]]) -> None:
        """``mods``: the watched modules (tree and outside); ``held``: (path, ``__dict__``, name, object) of the
        module attributes the forward read that only identity watches (``PythonState._same``); ``hooks``: (where,
        hook table) of every hook table watched."""
        self.names, self.called, self.written = reads.names, reads.called, reads.written
        self.advanced: list[str] = []
        """What names each generator reached here whose code the forward ran (resumed it: its position moves on
        every call; ``capture`` refuses it, review21)."""
        self.slots: list[list[Any]] = []
        """[kind, container, key, object at capture, what] (identity)."""
        self.snaps: list[list[Any]] = []
        """[kind, container, key, snapshot at capture, what] (value)."""
        self._walked: set[int] = set()
        self._lib: set[int] = set()
        """Ids of the containers reached from a package torch requires (``_library_place``: sympy's caches)."""
        self._left = MAX_REACHED
        for g, n in reads.globals:
            self._reach(_D, g, n, g.get(n, _MISSING), f"the global {n} (module {g.get('__name__', '?')})", 0)
        for c in dict.fromkeys(c for _, m in mods for c in type(m).__mro__ if _user_class(c)):
            self._class(c, 0)
        for path, d, k, v in held:
            self._reach(_D, d, k, v, f"{path}.{k}" if path else k, 0)
        for where, table in hooks:
            for key, h in list(table.items()):
                self._reach(_D, table, key, h, f"the hook {_kind(h)} of {where}", 0)
        env = getattr(os.environ, "_data", None)
        looked = getattr(reads, "env_keys", frozenset())
        if isinstance(env, dict) and ({"environ", "getenv"} & self.names or looked):  # os.environ.get("X") / getenv
            encode = getattr(os.environ, "encodekey", lambda k: k)
            named = ({n for n in self.names if n.isupper() or n in os.environ} if {"environ", "getenv"} & self.names
                     else set())
            for n in sorted(named | looked):
                key = encode(n)
                self._reach(_D, env, key, env.get(key, _MISSING), f"the environment variable {n}", 0)
        self._columns()

    def _reach(self, kind: int, c: Any, k: Any, v: Any, what: str, depth: int) -> None:
        if self._left <= 0 or (id(c), k) in self.written:
            return
        self._left -= 1
        self.slots.append([kind, c, k, v, what])
        if _immutable(v) or isinstance(v, types.ModuleType | torch.nn.Module) or depth >= MAX_REACH_DEPTH:
            return
        if v is os.environ:  # os.getenv's global: the variables the forward names are watched one by one (__init__)
            return
        if id(c) in self._lib or _library_place(kind, c):  # what it holds is that library's too
            self._lib.add(id(v))
            with contextlib.suppress(Exception):
                fields = getattr(v, "__dict__", None)
                if isinstance(fields, dict):
                    self._lib.add(id(fields))
                self._lib.update(id(cell) for cell in getattr(v, "__closure__", None) or ())
        if isinstance(v, torch.Tensor | list | dict | set | frozenset | collections.deque | bytearray | array.array
                      | memoryview) or _config_like(v):
            snap = snapshot(v, MAX_READ_ITEMS)
            if snap is not _UNWATCHED:
                self.snaps.append([kind, c, k, snap, what])
                return
        if id(v) in self._walked:
            return
        self._walked.add(id(v))
        d = depth + 1
        if isinstance(v, list | tuple):
            if isinstance(v, list) and (id(v), None) not in self.written:
                self.snaps.append([_K, v, None, len(v), f"the length of {what}"])
            for i, x in enumerate(v[:MAX_ITEMS]):
                self._reach(_L, v, i, x, f"{what}[{i}]", d)
        elif isinstance(v, dict):
            if (id(v), None) not in self.written:
                self.snaps.append([_K, v, None, tuple(v), f"the keys of {what}"])
            for key, x in list(v.items())[:MAX_ITEMS]:
                self._reach(_D, v, key, x, f"{what}[{key!r}]", d)
        elif isinstance(v, functools.partial):
            for a in ("func", "args", "keywords"):
                self._reach(_A, v, a, getattr(v, a), f"{what}.{a}", d)
        elif isinstance(v, types.MethodType):
            self._reach(_A, v, "__func__", v.__func__, f"{what}.__func__", d)
            self._reach(_A, v, "__self__", v.__self__, f"{what}.__self__", d)
        elif isinstance(v, types.FunctionType):
            if v.__code__ in self.called:
                for name, cell in zip(v.__code__.co_freevars, v.__closure__ or ()):
                    self._reach(_C, cell, None, _read(_C, cell, None),
                                f"the variable {name} that {v.__qualname__} closes over", d)
                self._reach(_A, v, "__defaults__", v.__defaults__, f"the defaults of {v.__qualname__}", d)
                self._reach(_A, v, "__kwdefaults__", v.__kwdefaults__, f"the defaults of {v.__qualname__}", d)
        elif isinstance(v, property):
            for a in ("fget", "fset"):
                self._reach(_A, v, a, getattr(v, a), f"{what}.{a}", d)
        elif isinstance(v, staticmethod | classmethod):
            self._reach(_A, v, "__func__", v.__func__, f"{what}.__func__", d)
        elif isinstance(v, type):
            self._walked.discard(id(v))  # _class marks it walked itself (else it returned at once: never walked)
            self._class(v, d)
        elif isinstance(v, types.GeneratorType):
            if v.gi_frame is not None and v.gi_code in self.called:
                self.advanced.append(what)
        elif _c_iterator(v):
            state = _iter_state(v) if (id(v), None) not in self.written else _UNWATCHED
            if state is not _UNWATCHED:
                self.snaps.append([_I, v, None, state, f"the position of the iterator {what}"])
        else:
            if (isinstance(v, functools._lru_cache_wrapper) and "cache_info" in self.names  # counters read: state
                    and (id(v), None) not in self.written):
                self.snaps.append([_Q, v, None, _read(_Q, v, None), f"the cache counters of {what}"])
            self._fields(v, what, d)

    def _fields(self, v: Any, what: str, depth: int) -> None:
        """A plain object's fields under the names the forward's code used (``__dict__`` and ``__slots__``); a
        name its class holds and its ``__dict__`` does not must stay absent there (it would shadow the class's)."""
        cls = type(v)
        fields = getattr(v, "__dict__", None)
        if isinstance(fields, dict):
            for n in sorted(self.names):
                if n in fields:
                    self._reach(_D, fields, n, fields[n], _field(what, n), depth)
                elif any(n in vars(k) for k in cls.__mro__[:-1]):
                    self._reach(_D, fields, n, _MISSING, _field(what, n), depth)
        for k in cls.__mro__:
            slots = vars(k).get("__slots__", ())
            for n in (slots,) if isinstance(slots, str) else slots:
                if n in self.names:
                    self._reach(_A, v, n, getattr(v, n, _MISSING), _field(what, n), depth)
        if _user_class(cls):
            self._class(cls, depth)

    def _class(self, c: type, depth: int) -> None:
        """A class's attributes under the names the forward's code used (found in its MRO's user classes: absent
        before the owner, the same object in it) and the functions in its dict the forward ran (methods,
        properties' getters: their closures)."""
        if id(c) in self._walked or not _user_class(c):
            return
        self._walked.add(id(c))
        mro = [k for k in c.__mro__ if _user_class(k)]
        for n in sorted(self.names):
            if n.startswith("__") and n.endswith("__"):
                continue
            for k in mro:
                kd = k.__dict__
                if n in kd:
                    self._reach(_P, kd, n, kd[n], f"the class attribute {k.__name__}.{n}", depth)
                    break
                if any(n in vars(later) for later in c.__mro__[c.__mro__.index(k) + 1:-1]):
                    self._reach(_P, kd, n, _MISSING, f"the class attribute {k.__name__}.{n}", depth)
        for n, x in list(vars(c).items()):
            fn = x.fget if isinstance(x, property) else getattr(x, "__func__", x)
            if isinstance(fn, types.FunctionType) and fn.__code__ in self.called and n not in self.names:
                self._reach(_P, c.__dict__, n, x, f"{c.__name__}.{n}", depth)

    def _columns(self) -> None:
        by: dict[int, list[list[Any]]] = {kind: [] for kind in (_D, _P, _C, _A)}
        self._rest = []
        for slot in self.slots:
            by.get(slot[0], self._rest).append(slot)
        self._cols = [(kind, [s[1] for s in ss], [s[2] for s in ss], [_MISSING] * len(ss), [s[3] for s in ss])
                      for kind, ss in by.items() if ss]

    def unchanged(self) -> bool:
        for kind, cs, ks, miss, expected in self._cols:
            if kind == _D:
                got = map(dict.get, cs, ks, miss)
            elif kind == _P:
                got = map(_PROXY_GET, cs, ks, miss)
            elif kind == _A:
                got = map(getattr, cs, ks, miss)
            else:
                got = (_read(_C, c, None) for c in cs)
            if not all(map(operator.is_, got, expected)):
                return False
        return (all(_read(kind, c, k) is v for kind, c, k, v, _ in self._rest)
                and all(self._now(kind, c, k) == snap for kind, c, k, snap, _ in self.snaps))

    @staticmethod
    def _now(kind: int, c: Any, k: Any) -> Any:
        v = _read(kind, c, k)
        return v if kind in (_K, _Q, _I) else snapshot(v, MAX_READ_ITEMS)

    def holds_data(self) -> bool:
        """Whether the forward may move a place watched here, so that capture runs it once more to see
        (``capture._forward_writes``): a snapshot (a container, a tensor, a configuration object), a slot holding an
        object that is no function, class or descriptor, or one holding an immutable value (a number, a string,
        None, a tuple of them; or absent) that the code the forward ran stores under its name (``STORE_ATTR n``,
        ``STORE_GLOBAL``, ``STORE_DEREF``, ``setattr(x, "n", ...)``: ``_stored_names``), or any where that code
        can store under a name it builds (``setattr``, ``vars``, ``globals``, ``__dict__``, ``exec``). Session 21
        ran the extra forward and a graph run for every torchvision model (a function's ``__defaults__`` of None
        counted as data): 190 ms of resnet18's 1.3 s capture (session 22, loaded machine)."""
        if self.snaps:
            return True
        stored: frozenset[str] | None = None
        for kind, _, k, v, _ in self.slots:
            if isinstance(v, _CODE_LIKE):
                continue
            if not (v is _MISSING or _immutable(v)):
                return True
            if stored is None:
                if not self.names.isdisjoint(_NAMES_BUILT):
                    return True
                stored = _stored_names(self.called)
            name = "__defaults__" if kind == _A and k == "__kwdefaults__" else k
            if not isinstance(name, str) or name in stored:
                return True
        return False

    def moves(self, consumed: Mapping[int, tuple[Any, str]] | None = None) -> list[tuple[tuple[int, Any], str, str,
                                                                                          bool]]:
        """((id of the container, key), what, "old -> new", scratch) of every slot whose object or snapshot differs
        now (capture: what the forward changed when run again). ``scratch`` (per-call, ``ForwardReads.written``): a
        snapshot that only gained entries (``_grew``), a place of a package torch requires or reached from one
        (``_library_place``: sympy's ``Dummy._count``, its caches), an ``itertools.count`` (a source of fresh names);
        an object rebound (an equal
        number or tuple is no change) or any other difference is not."""
        out = []
        for kind, c, k, v, what in self.slots:
            now = _read(kind, c, k)
            if now is not v and not (_immutable(v) and _immutable(now) and type(v) is type(now) and now == v):
                old, new = _describe(v), _describe(now)
                scratch = id(c) in self._lib or _library_place(kind, c) or (
                    kind in (_D, _A, _P) and isinstance(k, str) and _number(v) and _number(now)
                    and accumulated(k, self.called))  # a log-only counter: ``self.h.calls += 1`` and no other use
                out.append(((id(c), k), what, f"{old} -> {new}" if old != new else f"{old} replaced by another object",
                            scratch))
        consumed = consumed or {}
        for kind, c, k, snap, what in self.snaps:
            now = self._now(kind, c, k)
            if now != snap:
                text = ("moved on" if kind == _I else f"{snap!r:.60} -> {now!r:.60}" if kind in (_K, _Q)
                        else _difference(snap, now))
                scratch = (_grew(kind, snap, now) or id(c) in self._lib or _library_place(kind, c)
                           or (kind == _I and type(c) is itertools.count)
                           or (kind in (_D, _A, _P) and isinstance(k, str) and type(snap) is tuple and snap
                               and snap[0] is dict and accumulated(k, self.called, container=True)))
                used = consumed.get(id(c if kind in (_K, _Q, _I) else _read(kind, c, k)))
                if scratch and used is not None:  # grows, or counts, but its length or next value is read as a value
                    scratch, text = False, f"{text}; {used[1]}"
                out.append(((id(c), k), what, text, scratch))
        return out

    def changed(self) -> tuple[None, str, str] | None:
        """(None, what, "old -> new") of the first slot that changed, or None (an equal number or tuple rebound
        is taken as the new baseline)."""
        rebased = False
        for slot in self.slots:
            kind, c, k, v, what = slot
            now = _read(kind, c, k)
            if now is v:
                continue
            if _immutable(v) and _immutable(now) and type(v) is type(now) and now == v:
                slot[3], rebased = now, True
                continue
            if rebased:
                self._columns()
            old, new = _describe(v), _describe(now)
            return None, what, f"{old} -> {new}" if old != new else f"{old} replaced by another object"
        if rebased:
            self._columns()
        for kind, c, k, snap, what in self.snaps:
            now = self._now(kind, c, k)
            if now != snap:
                if kind in (_K, _Q, _I):
                    return None, what, f"{snap!r:.60} -> {now!r:.60}"
                return None, what, _difference(snap, now)
        return None


class PythonState:
    """The watched attributes of ``module`` and its submodules, as they are now (see the module doc).

    Snapshotting costs one walk of the module tree; ``changed`` re-reads only the recorded attributes
    (~0.2 us each)."""

    def __init__(self, module: torch.nn.Module, reads: ForwardReads | None = None) -> None:
        """``reads``: what the forward looked up at capture (``ModelGraph.python_reads``; None: not known, and
        then class attributes are not watched, attributes over ``MAX_ITEMS`` items are not either, and any
        number, string or tensor added to a submodule is refused)."""
        self.entries: list[tuple[str, dict, str, Any]] = []
        """(where: submodule path, its ``__dict__``, attribute, snapshot at construction)."""
        self._paths: set[tuple[str, str]] = set()
        self._quick: list[tuple[dict, str, Any]] = []
        """(``__dict__``, attribute, the immutable object it held: a scalar or a tuple of them): checked by
        identity first."""
        self._slow: list[int] = []
        self._same: list[tuple[str, dict, str, Any]] = []
        """(where, ``__dict__``, attribute, object): an attribute the forward read at capture that no snapshot
        watches (a function, a ``functools.partial``, a lambda, an object of another class, a container of them):
        the same object must stay there (``model.act = partial(F.leaky_relu, negative_slope=0.3)`` answered the
        captured 0.1 on every path, final15); what changes inside such an object is not seen."""
        self._quick_cols: tuple[list, ...] | None = None
        """Indices of the entries holding tensors or containers (compared by snapshot)."""
        self._mods = [*module.named_modules(remove_duplicate=False), *(() if reads is None else reads.outside)]
        self._registered = {t.untyped_storage().data_ptr() for _, mod in self._mods
                            for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None}
        """Storage of the module's parameters and buffers: a plain tensor attribute on it is an alias of one
        (legacy ``nn.utils.spectral_norm`` keeps ``weight`` as ``weight_orig.data`` until its hook replaces it
        each forward); the parameter itself is what counts (``ue_client.model.WeightWatch``)."""
        self._structure = _Structure(self._mods, reads)
        self._classes = None if reads is None else _ClassReads(self._mods, reads)
        self._budgets: dict[int, int] = {}
        """Entries snapshotted with a larger budget than ``MAX_ITEMS`` (read by the forward at capture)."""
        self._scratch: set[tuple[str, str]] = set()
        """(submodule path, attribute) the forward set before reading (``ForwardReads.scratch``): not watched."""
        if reads is not None:
            self._scratch = {(p, n) for p, names in reads.scratch.items() for n in names}
        for path, mod in self._mods:
            d = vars(mod)
            read = () if reads is None else reads.instance.get(path, ())
            for k, v in d.items():
                if k in MODULE_INTERNALS or (path, k) in self._scratch:
                    continue
                s = snapshot(v)
                if s is _UNWATCHED and k in read:
                    s = snapshot(v, MAX_READ_ITEMS)
                    if s is not _UNWATCHED:
                        self._budgets[len(self.entries)] = MAX_READ_ITEMS
                    else:  # a module too: one kept around ``nn.Module.__setattr__`` is read from the ``__dict__``
                        self._same.append((path, d, k, v))
                        self._paths.add((path, k))
                        continue
                if s is not _UNWATCHED:
                    self.entries.append((path, d, k, s))
                    self._paths.add((path, k))
                    if _immutable(v):  # unchanged while the attribute holds the same object
                        self._quick.append((d, k, v))
                    else:
                        self._slow.append(len(self.entries) - 1)
        self._entry_index = {id(e): i for i, e in enumerate(self.entries)}
        self.reached: _Reached | None = None
        """What the forward read past the modules' attributes (``_Reached``; None: not traced)."""
        if reads is not None and (reads.called or reads.globals):
            hooks = [(f"{path or '<root>'} ({name.strip('_').replace('_', ' ')})" if path is not None
                      else f"the global {name.strip('_').replace('_', ' ')}", t)
                     for (path, name), t in zip(self._structure.hook_where, self._structure.hook_tables) if t]
            self.reached = _Reached(reads, self._mods, [e for e in self._same if e[3] is not None], hooks)

    def forget_scratch(self, reads: ForwardReads | None) -> None:
        """Leave out of ``changed`` the attributes the forward set before reading (``ForwardReads.scratch``):
        capture's check of a snapshot taken before the trace."""
        if reads is not None:
            self._scratch |= {(p, n) for p, names in reads.scratch.items() for n in names}

    def accumulates(self, path: str, attr: str, reads: ForwardReads) -> bool:
        """Whether the attribute ``attr`` of the submodule at ``path`` held a number when snapshotted and holds one now,
        and the user code the forward ran only adds to it in place (``accumulated``: a log-only counter)."""
        old = next((snap for p, _, k, snap in self.entries if p == path and k == attr), _MISSING)
        mod = next((m for p, m in self._mods if p == path), None)
        now = vars(mod).get(attr, _MISSING) if mod is not None else _MISSING
        return _number(old) and _number(now) and accumulated(attr, reads.called)

    def storage_moved(self) -> None:
        """The module's parameters and buffers moved their storage whole (``module.share_memory()``): note where."""
        self._registered = {t.untyped_storage().data_ptr() for _, mod in self._mods
                            for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None}

    def quick_unchanged(self) -> bool:
        """Every attribute holding a scalar or a tuple of them still holds an equal one (one C-level pass:
        ~30 ns per attribute); the others (tensors, mutable containers) are not looked at."""
        if self._quick_cols is None:
            ds, ks, vs = zip(*self._quick) if self._quick else ((), (), ())
            self._quick_cols = (list(ds), list(ks), list(vs), [e[1] for e in self._same], [e[2] for e in self._same],
                                [e[3] for e in self._same])
        ds, ks, vs, sds, sks, svs = self._quick_cols
        return list(map(dict.get, ds, ks)) == vs and all(map(operator.is_, map(dict.get, sds, sks), svs))

    def unchanged(self, reads: set[int] | None = None) -> bool:
        """``changed(reads) is None``, at C speed when no tensor or mutable container is watched."""
        if (self.quick_unchanged() and not self._slow and self._structure.unchanged()
                and (self._classes is None or self._classes.unchanged(lambda x: self._project(x, reads)))
                and (self.reached is None or self.reached.unchanged())):
            return True
        return self.changed(reads) is None

    def changed(self, reads: set[int] | None = None, *, new_attrs: bool = False) -> tuple[str, str, str] | None:
        """(submodule path, attribute, "old -> new") of the first watched attribute that differs now; None if
        none. ``reads``: storage pointers of the tensors the graph reads; a tensor attribute not among them
        is skipped (a forward that keeps an activation on ``self`` changes nothing the graph computes); None:
        every tensor attribute counts. ``new_attrs``: also report a scalar attribute set since the snapshot
        (a forward that sets ``self.n`` the first time it runs)."""
        hit = self._structure.changed(added=not new_attrs)
        if hit is not None:
            return hit
        if self._classes is not None:
            hit = self._classes.changed(lambda x: self._project(x, reads))
            if hit is not None:
                return hit
        for path, d, k, v in self._same:
            if (path, k) in self._scratch:
                continue
            cur = d.get(k, _MISSING)
            if cur is not v:
                return path, k, (f"{_kind(v)} replaced by {'<deleted>' if cur is _MISSING else _kind(cur)}")
        if self.reached is not None:
            hit = self.reached.changed()
            if hit is not None:
                return hit
        if self.quick_unchanged():
            candidates = [self.entries[i] for i in self._slow]
        else:
            candidates = self.entries
        for entry in candidates:
            path, d, k, old = entry
            if (path, k) in self._scratch:
                continue
            if isinstance(old, _TensorMark) and ((reads is not None and old.tensor.untyped_storage().data_ptr()
                                                  not in reads) or old.tensor.untyped_storage().data_ptr()
                                                 in self._registered):
                continue
            cur = d.get(k, _MISSING)
            new = _MISSING if cur is _MISSING else snapshot(cur, self._budgets.get(self._entry_index[id(entry)],
                                                                                 MAX_ITEMS))
            if not isinstance(old, _TensorMark) and isinstance(old, tuple):  # a container: only the tensors read count
                old_seen, new_seen = self._project(old, reads), self._project(new, reads)
                if new_seen != old_seen:
                    return path, k, _difference(old_seen, new_seen)
                continue
            if new != old:
                if isinstance(old, _TensorMark) and isinstance(new, _TensorMark):
                    how = "changed in place" if new.tensor is old.tensor else "replaced by another tensor"
                    return path, k, f"{old!r} {how}"
                return path, k, f"{_show(old)} -> {_show(new)}"
        if new_attrs:
            for path, mod in self._mods:
                for k, v in vars(mod).items():
                    if (k not in MODULE_INTERNALS and (path, k) not in self._paths and (path, k) not in self._scratch
                            and isinstance(v, SCALARS)):
                        return path, k, f"<unset> -> {v!r}"
        return None


    def _project(self, s: Any, reads: set[int] | None) -> Any:
        """A container's snapshot with each tensor the graph does not read (or a registered parameter or buffer's
        alias) as ``_ANY``: an activation a forward keeps in a list is not a change, a constant replaced is."""
        if isinstance(s, _TensorMark):
            ptr = s.tensor.untyped_storage().data_ptr()
            return _ANY if (reads is not None and ptr not in reads) or ptr in self._registered else s
        if type(s) is tuple:
            return tuple(self._project(x, reads) for x in s)
        return s


def _kind(v: Any) -> str:
    """A short name of an object watched by identity (``PythonState._same``)."""
    name = getattr(v, "__qualname__", None) or getattr(getattr(v, "func", None), "__qualname__", None)
    return f"{type(v).__name__} {name}" if isinstance(name, str) else f"a {type(v).__name__} object"


class _Structure:
    """What a forward runs besides its attributes' values: each submodule's children (``module.fc = ...``,
    an activation swapped, a layer appended to a ``ModuleList``), its class and the class's ``forward``
    (``nn.ReLU.forward = ...``), a ``forward`` set on the instance,
    and the forward hooks and pre-hooks registered on it or globally (``register_forward_hook`` after capture:
    the graph runs the hooks present at capture, and no other). Session 14 (attack14): each of these changed
    after the client was built gave a silently wrong answer on every path (0.18-9.3 max|diff| from
    ``model(x)``). Checked per call in C-level passes (one tuple per submodule and hook table)."""

    def __init__(self, mods: list[tuple[str, torch.nn.Module]], reads: ForwardReads | None = None) -> None:
        from torch.nn.modules import module as _m  # the global hook tables

        self.reads = reads
        """What the forward looked up at capture: a plain attribute added later is refused only under a name it
        looked up and missed, or one that shadows a class attribute it read (None: any number, string or
        tensor added is refused)."""
        self.paths = [p for p, _ in mods]
        self.mods = [m for _, m in mods]
        self.types = list(map(type, self.mods))
        self.dicts = [vars(m) for m in self.mods]
        self.forwards = [d.get("forward") for d in self.dicts]
        self.children = [m._modules for m in self.mods]
        self.kids = list(map(tuple, map(dict.values, self.children)))
        self.names = list(map(tuple, self.children))
        self.hook_tables = [getattr(m, t, {}) for m in self.mods for t in _HOOK_TABLES] + [
            getattr(_m, g, {}) for g in _GLOBAL_HOOK_TABLES]
        self.hook_where = [(p, t) for p in self.paths for t in _HOOK_TABLES] + [(None, g) for g in _GLOBAL_HOOK_TABLES]
        """(submodule path or None for the global tables, table name) of each of ``hook_tables``."""
        self.hooks = [tuple(t.items()) for t in self.hook_tables]
        """Each table's (key, hook) pairs at capture: a hook replaced under its key (``m._forward_hooks[k] = f``)
        is a change too (session 14's last attacker: 0.36-0.57 off when only the keys were compared)."""
        # per call: tables empty at capture must stay empty (``any``: one C-level pass), the others hold the same
        # entries (densenet121: 433 submodules, 67 with children, no hooks: 148 -> ~40 us per call, load ~3)
        self._empty = [t for t in (*self.children, *self.hook_tables) if not t]
        self._full_kids = [(c, k) for c, k in zip(self.children, self.kids) if c]
        self._full_hooks = [(t, h) for t, h in zip(self.hook_tables, self.hooks) if t]
        self._fw = ["forward"] * len(self.dicts)
        self.tables = [t for m in self.mods for t in (vars(m), m._parameters, m._buffers)]
        self.sizes = list(map(len, self.tables))
        self.keys = [frozenset(t) for t in self.tables]
        """Each submodule's ``__dict__``, parameter and buffer tables, their sizes and names at capture: a number,
        a tensor, a parameter or a buffer added after capture (``model.scale = 3.0``,
        ``register_buffer("extra_bias", ...)``) is what ``getattr(self, "scale", 1.0)`` in forward reads, which
        the graph saw missing (a silently wrong answer on every path before; session 14)."""
        self.classes = list(dict.fromkeys(self.types))
        self.class_forwards = [getattr(c, "forward", None) for c in self.classes]
        """Each submodule class's ``forward`` (a class patched after capture, ``nn.ReLU.forward = ...``)."""

    def unchanged(self) -> bool:
        return (not any(self._empty)
                and all(tuple(c.values()) == k for c, k in self._full_kids)
                and all(tuple(t.items()) == h for t, h in self._full_hooks)
                and list(map(type, self.mods)) == self.types
                and list(map(dict.get, self.dicts, self._fw)) == self.forwards
                and [getattr(c, "forward", None) for c in self.classes] == self.class_forwards
                and (list(map(len, self.tables)) == self.sizes or self._added() is None))

    def _added(self) -> tuple[str, str, str] | None:
        """(submodule path, name, what) of the first number, string, tensor, parameter or buffer added to a
        submodule since capture; None when every addition is of another kind (a list of class names, an
        object: metadata a forward does not compute with)."""
        for i, table in enumerate(self.tables):
            if len(table) == self.sizes[i] and table.keys() == self.keys[i]:
                continue
            for k in table.keys() - self.keys[i]:
                v = table[k]
                kind = ("parameter", "buffer")[i % 3 - 1] if i % 3 else "attribute"
                path = self.paths[i // 3]
                if i % 3 == 0:
                    if k in MODULE_INTERNALS:
                        continue
                    if self.reads is not None and path not in self.reads.untraced:
                        if k not in self.reads.missed.get(path, ()) and k not in self.reads.classes.get(path, ()):
                            continue  # a name the forward never looked up (``model.name = "x"``): nothing it computes
                    elif not isinstance(v, (*SCALARS, torch.Tensor)):
                        continue  # reads not known: metadata of other kinds (a list of class names) is let be
                if v is None and i % 3:
                    continue
                article = "an" if kind == "attribute" else "a"
                return path, k, f"{article} {kind} added after capture ({_show(snapshot(v))})"
        self._rebase()
        return None

    def _rebase(self) -> None:
        """Take the tables as they are now as the baseline (after additions that change nothing the forward
        computes), so the per-call check stays one C-level pass; a later addition is compared with it."""
        for i, table in enumerate(self.tables):
            if len(table) != self.sizes[i] or table.keys() != self.keys[i]:
                self.sizes[i], self.keys[i] = len(table), frozenset(table)

    def changed(self, added: bool = True) -> tuple[str, str, str] | None:
        """(submodule path, what, "old -> new") of the first change, or None. ``added``: count attributes,
        parameters and buffers added since (not at capture, where a forward's first activation kept on
        ``self`` is one, and ``PythonState.changed(new_attrs=True)`` names new scalars)."""
        if self.unchanged():
            return None
        for i, (path, mod) in enumerate(zip(self.paths, self.mods)):
            if type(mod) is not self.types[i]:
                return path, "__class__", f"{self.types[i].__name__} -> {type(mod).__name__}"
            if self.dicts[i].get("forward") is not self.forwards[i]:
                return path, "forward", "a forward set on the instance after capture"
            if tuple(self.children[i]) != self.names[i] or tuple(self.children[i].values()) != self.kids[i]:
                for name, old in zip(self.names[i], self.kids[i]):
                    new = self.children[i].get(name, _MISSING)
                    if new is not old:
                        return path, name, (f"submodule {type(old).__name__} -> "
                                            f"{'<unset>' if new is _MISSING else type(new).__name__}")
                added = [n for n in self.children[i] if n not in self.names[i]]
                return path, added[0] if added else "<children>", "a submodule added"
        for c, fw in zip(self.classes, self.class_forwards):
            if getattr(c, "forward", None) is not fw:
                return "", f"{c.__name__}.forward", "the class's forward replaced after capture"
        hit = self._added() if added else None
        if hit is not None:
            return hit
        for j, table in enumerate(self.hook_tables):
            now = tuple(table.items())
            if now != self.hooks[j]:
                path, name = self.hook_where[j]
                what = ("replaced under its key" if tuple(table) == tuple(k for k, _ in self.hooks[j])
                        else "added or removed")
                kind = name.removeprefix("_global").strip("_").replace("_", " ")
                if path is None:
                    return "", "<global hooks>", f"an entry of the global {kind} table {what}"
                return path, name, f"an entry of its {kind} table {what}"
        return None


def weight_reads(graph: Any) -> set[int]:
    """Storage pointers of what a captured ``ModelGraph`` reads: its weight tensors and the module's own
    tensors behind contiguous copies (``ModelGraph.weight_sources``); ``changed(reads=...)`` takes them."""
    return {t.untyped_storage().data_ptr() for t in (*graph.weight_values.values(),
                                                     *getattr(graph, "weight_sources", {}).values())}


def _difference(old: Any, new: Any) -> str:
    """"old -> new" of two snapshots; for two lists, tuples or dicts too long to show whole, the first item that
    differs."""
    a_text, b_text = _show(old), _show(new)
    text = f"{a_text} -> {b_text}"
    same_kind = (isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new) == 2
                 and old[0] is new[0] and old[0] in (dict, list, tuple))
    if (len(text) < 120 and a_text != b_text) or not same_kind:
        return text
    a, b = old[1], new[1]
    if old[0] is dict:
        da, db = dict(a), dict(b)
        for key in (*da, *(k for k in db if k not in da)):
            if da.get(key, _MISSING) != db.get(key, _MISSING):
                return f"item {key!r}: {_show(da.get(key, _MISSING))} -> {_show(db.get(key, _MISSING))}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"item {i}: {_show(x)} -> {_show(y)}"
    return f"{len(a)} items -> {len(b)}"


def _show(s: Any) -> str:
    if s is _UNWATCHED:
        return "<another kind of value>"
    if isinstance(s, tuple) and len(s) == 2 and s[0] in (dict, list, tuple, set, collections.deque):
        text = repr(s[0](s[1]) if s[0] is not set else set(s[1]))
        return text if len(text) <= 60 else f"<a {s[0].__name__} of {len(s[1])} items>"
    if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], type) and isinstance(s[1], tuple):
        text = f"{s[0].__name__}({', '.join(f'{k}={_show(x)}' for k, x in s[1])})"  # a configuration object
        return text if len(text) <= 80 else f"<a {s[0].__name__} of {len(s[1])} fields>"
    if s == ("nan",):
        return "nan"
    return repr(s)


MAX_WALK = 20_000
"""Objects ``ConstantSources`` looks at, at most, for the owners of lifted constants (once, when a client is built)."""


class ConstantSources:
    """Where the module keeps the tensors its graph lifted as constants outside its parameters and buffers, and a
    per-call check that they are still there.

    ``torch.export`` lifts a tensor the forward reads from outside the module tree (an ``nn.Linear`` kept in a
    plain list, a dict, an attribute set around ``nn.Module.__setattr__``, a tensor in a container) as a constant:
    the graph's copy shares the tensor's storage but not its version counter, and the server holds the bytes it
    was sent. Session 14's last attacker changed such a weight in place: local runs read the new values, offloaded
    ones the old (1.04 max|diff| from ``model(x)``), and neither watch saw it. Here the objects reachable from each
    submodule's plain attributes (lists, tuples, dicts, configuration objects, modules outside the tree and their
    parameters, buffers, children and attributes; at most ``MAX_WALK`` objects, cycles once) are searched for
    the tensors on the constants' storage (``wanted``: storage pointers). ``found``: (path from the root module,
    e.g. ``heads[0].weight``, the user's tensor) for ``ue_client.model.WeightWatch`` to watch (version counter and
    storage, as a parameter); ``replaced()`` names the first step of a found path that no longer holds the same
    object (``heads[0] = nn.Linear(...)``, ``heads[0].weight = nn.Parameter(...)``). A constant not found (a module
    global, a closure's tensor, a tensor made in forward) stays unwatched."""

    def __init__(self, module: torch.nn.Module, wanted: set[int]) -> None:
        self.found: list[tuple[str, torch.Tensor]] = []
        steps: dict[tuple[int, Any], tuple[Any, Any, Any, str]] = {}
        registered = {id(m) for m in module.modules()}
        seen: set[int] = set()
        # a node: (object, its parent node, the container it was read from, the key, the path's text)
        queue: list[tuple[Any, Any, Any, Any, str]] = []
        for path, mod in module.named_modules():
            d = vars(mod)
            queue.extend((v, None, d, k, f"{path}.{k}" if path else k) for k, v in d.items()
                         if k not in MODULE_INTERNALS)
        left = MAX_WALK
        i = 0
        while i < len(queue) and left > 0:
            node = queue[i]
            i += 1
            v, _, _, _, text = node
            if isinstance(v, SCALARS) or id(v) in seen:
                continue
            seen.add(id(v))
            left -= 1
            if isinstance(v, torch.Tensor):
                if v.untyped_storage().data_ptr() in wanted:
                    self.found.append((text, v))
                    n = node
                    while n is not None:
                        steps.setdefault((id(n[2]), n[3]), (n[2], n[3], n[0], n[4]))
                        n = n[1]
                continue
            if isinstance(v, torch.nn.Module):
                if id(v) in registered:
                    continue  # the module tree: its tensors are the module's own (``WeightWatch``)
                d = vars(v)
                for table in ("_parameters", "_buffers", "_modules"):
                    t = d.get(table)
                    if isinstance(t, dict):
                        hop = (t, node, d, table, text)
                        queue.extend((x, hop, t, k, f"{text}.{k}") for k, x in t.items() if x is not None)
                queue.extend((x, node, d, k, f"{text}.{k}") for k, x in d.items() if k not in MODULE_INTERNALS)
            elif isinstance(v, list | tuple):
                queue.extend((x, node, v, j, f"{text}[{j}]") for j, x in enumerate(v))
            elif isinstance(v, dict):
                queue.extend((x, node, v, k, f"{text}[{k!r}]") for k, x in v.items())
            elif _config_like(v) and isinstance(getattr(v, "__dict__", None), dict):
                d = vars(v)
                queue.extend((x, node, d, k, f"{text}.{k}") for k, x in d.items())
        self.complete = left > 0
        """False when the walk stopped at ``MAX_WALK`` objects (what it had not reached is not watched)."""
        self._dicts = [(c, k, x, text) for c, k, x, text in steps.values() if isinstance(c, dict)]
        self._lists = [(c, k, x, text) for c, k, x, text in steps.values() if isinstance(c, list)]
        """Steps through tuples are not checked: a tuple's items cannot change (the tuple itself is a step)."""
        self._cols = (list(c for c, _, _, _ in self._dicts), list(k for _, k, _, _ in self._dicts),
                      list(x for _, _, x, _ in self._dicts))

    def unchanged(self) -> bool:
        """Every step of every found path holds the object it held (one C-level pass over the dict steps)."""
        ds, ks, xs = self._cols
        return all(map(operator.is_, map(dict.get, ds, ks), xs)) and all(
            k < len(c) and c[k] is x for c, k, x, _ in self._lists)

    def replaced(self) -> str | None:
        """The path of the first step that holds another object now, or None."""
        for c, k, x, text in (*self._dicts, *self._lists):
            now = c.get(k, _MISSING) if isinstance(c, dict) else (c[k] if k < len(c) else _MISSING)
            if now is not x:
                return text
        return None


def _marks(snap: Any) -> Iterator[torch.Tensor]:
    """The tensors of a snapshot (``_TensorMark``s, nested)."""
    if isinstance(snap, _TensorMark):
        yield snap.tensor
    elif isinstance(snap, tuple):
        for x in snap:
            yield from _marks(x)


def made_in_forward(module: torch.nn.Module, reads: ForwardReads, constants: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of ``constants`` (tensors ``torch.export`` lifted) that no tensor of the user's holds: not on the
    storage of a parameter, buffer or tensor reachable from the module's attributes (``ConstantSources``), of a
    module called outside the tree, or of a tensor reached from the globals, closures and objects the forward read
    (``_Reached``). Such a constant was made by the forward itself (``torch.tensor([0.1, 0.2])``): in torch's
    default dtype when it is floating and no dtype was given, which the graph then keeps under another default.
    When the walk stops at ``MAX_WALK`` objects, what it did not reach counts as made in forward."""
    owned: set[int] = set()
    for _, m in [*module.named_modules(remove_duplicate=False), *reads.outside]:
        owned.update(t.untyped_storage().data_ptr() for t in (*m._parameters.values(), *m._buffers.values())
                     if t is not None)
    left = {n: t.untyped_storage().data_ptr() for n, t in constants.items()
            if t.untyped_storage().data_ptr() not in owned}
    if not left:
        return []
    sources = ConstantSources(module, set(left.values()))
    owned.update(t.untyped_storage().data_ptr() for _, t in sources.found)
    reached = _Reached(reads, [*module.named_modules(remove_duplicate=False), *reads.outside], [], [])
    owned.update(v.untyped_storage().data_ptr() for _, _, _, v, _ in reached.slots if isinstance(v, torch.Tensor))
    owned.update(t.untyped_storage().data_ptr() for _, _, _, snap, _ in reached.snaps for t in _marks(snap))
    return [n for n, ptr in left.items() if ptr not in owned]
