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

import argparse
import dataclasses
import math
import types
from typing import Any

import torch

SCALARS = (bool, int, float, complex, str, type(None))
MAX_DEPTH = 3
MAX_ITEMS = 64
MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks")
"""A module's hook tables whose entries run in forward (with-kwargs and always-called flags share their keys)."""
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
    if depth < MAX_DEPTH and _config_like(v) and isinstance(getattr(v, "__dict__", None), dict):
        fields = vars(v)
        budget[0] -= len(fields)
        if budget[0] < 0:
            return _UNWATCHED
        snaps = ((k, _snap(x, depth + 1, budget)) for k, x in fields.items())
        return (type(v), tuple((k, x) for k, x in snaps if x is not _UNWATCHED))  # fields of other kinds: skipped
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


def _immutable(v: Any) -> bool:
    """A scalar, or a tuple of immutables (what identity alone says is unchanged)."""
    return isinstance(v, SCALARS) or (type(v) is tuple and all(_immutable(x) for x in v))


def snapshot(v: Any) -> Any:
    """A comparable copy of an attribute's value (``_UNWATCHED`` for what is not watched)."""
    return _snap(v, 0, [MAX_ITEMS])


class PythonState:
    """The watched attributes of ``module`` and its submodules, as they are now (see the module doc).

    Snapshotting costs one walk of the module tree; ``changed`` re-reads only the recorded attributes
    (~0.2 us each)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.entries: list[tuple[str, dict, str, Any]] = []
        """(where: submodule path, its ``__dict__``, attribute, snapshot at construction)."""
        self._paths: set[tuple[str, str]] = set()
        self._quick: list[tuple[dict, str, Any]] = []
        """(``__dict__``, attribute, the immutable object it held: a scalar or a tuple of them): checked by
        identity first."""
        self._slow: list[int] = []
        self._quick_cols: tuple[list, list, list] | None = None
        """Indices of the entries holding tensors or containers (compared by snapshot)."""
        self._mods = list(module.named_modules(remove_duplicate=False))
        self._registered = {t.untyped_storage().data_ptr() for _, mod in self._mods
                            for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None}
        """Storage of the module's parameters and buffers: a plain tensor attribute on it is an alias of one
        (legacy ``nn.utils.spectral_norm`` keeps ``weight`` as ``weight_orig.data`` until its hook replaces it
        each forward); the parameter itself is what counts (``ue_client.model.WeightWatch``)."""
        self._structure = _Structure(self._mods)
        for path, mod in self._mods:
            d = vars(mod)
            for k, v in d.items():
                if k in MODULE_INTERNALS:
                    continue
                s = snapshot(v)
                if s is not _UNWATCHED:
                    self.entries.append((path, d, k, s))
                    self._paths.add((path, k))
                    if _immutable(v):  # unchanged while the attribute holds the same object
                        self._quick.append((d, k, v))
                    else:
                        self._slow.append(len(self.entries) - 1)

    def quick_unchanged(self) -> bool:
        """Every attribute holding a scalar or a tuple of them still holds an equal one (one C-level pass:
        ~30 ns per attribute); the others (tensors, mutable containers) are not looked at."""
        if self._quick_cols is None:
            ds, ks, vs = zip(*self._quick) if self._quick else ((), (), ())
            self._quick_cols = (list(ds), list(ks), list(vs))
        ds, ks, vs = self._quick_cols
        return list(map(dict.get, ds, ks)) == vs

    def unchanged(self, reads: set[int] | None = None) -> bool:
        """``changed(reads) is None``, at C speed when no tensor or mutable container is watched."""
        if self.quick_unchanged() and not self._slow and self._structure.unchanged():
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
        if self.quick_unchanged():
            candidates = [self.entries[i] for i in self._slow]
        else:
            candidates = self.entries
        for path, d, k, old in candidates:
            if isinstance(old, _TensorMark) and ((reads is not None and old.tensor.untyped_storage().data_ptr()
                                                  not in reads) or old.tensor.untyped_storage().data_ptr()
                                                 in self._registered):
                continue
            cur = d.get(k, _MISSING)
            new = _MISSING if cur is _MISSING else snapshot(cur)
            if not isinstance(old, _TensorMark) and isinstance(old, tuple):  # a container: only the tensors read count
                old_seen, new_seen = self._project(old, reads), self._project(new, reads)
                if new_seen != old_seen:
                    return path, k, f"{_show(old_seen)} -> {_show(new_seen)}"
                continue
            if new != old:
                if isinstance(old, _TensorMark) and isinstance(new, _TensorMark):
                    how = "changed in place" if new.tensor is old.tensor else "replaced by another tensor"
                    return path, k, f"{old!r} {how}"
                return path, k, f"{_show(old)} -> {_show(new)}"
        if new_attrs:
            for path, mod in self._mods:
                for k, v in vars(mod).items():
                    if k not in MODULE_INTERNALS and (path, k) not in self._paths and isinstance(v, SCALARS):
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


class _Structure:
    """What a forward runs besides its attributes' values: each submodule's children (``module.fc = ...``,
    an activation swapped, a layer appended to a ``ModuleList``), its class and the class's ``forward``
    (``nn.ReLU.forward = ...``), a ``forward`` set on the instance,
    and the forward hooks and pre-hooks registered on it or globally (``register_forward_hook`` after capture:
    the graph runs the hooks present at capture, and no other). Session 14 (attack14): each of these changed
    after the client was built gave a silently wrong answer on every path (0.18-9.3 max|diff| from
    ``model(x)``). Checked per call in C-level passes (one tuple per submodule and hook table)."""

    def __init__(self, mods: list[tuple[str, torch.nn.Module]]) -> None:
        from torch.nn.modules import module as _m  # the global hook tables

        self.paths = [p for p, _ in mods]
        self.mods = [m for _, m in mods]
        self.types = list(map(type, self.mods))
        self.dicts = [vars(m) for m in self.mods]
        self.forwards = [d.get("forward") for d in self.dicts]
        self.children = [m._modules for m in self.mods]
        self.kids = list(map(tuple, map(dict.values, self.children)))
        self.names = list(map(tuple, self.children))
        self.hook_tables = [getattr(m, t) for m in self.mods for t in _HOOK_TABLES] + [
            getattr(_m, g) for g in ("_global_forward_hooks", "_global_forward_pre_hooks")]
        self.hooks = list(map(tuple, self.hook_tables))
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
                and all(tuple(t) == h for t, h in self._full_hooks)
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
                if i % 3 == 0 and (k in MODULE_INTERNALS or not isinstance(v, (*SCALARS, torch.Tensor))):
                    continue
                if v is None and i % 3:
                    continue
                article = "an" if kind == "attribute" else "a"
                return self.paths[i // 3], k, f"{article} {kind} added after capture ({_show(snapshot(v))})"
        return None

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
            if tuple(table) != self.hooks[j]:
                k = j // len(_HOOK_TABLES)
                kind = _HOOK_TABLES[j % len(_HOOK_TABLES)][1:-1].replace("_", " ")
                if k >= len(self.paths):
                    return "", "<global hooks>", f"a global {'forward pre-hook' if j % 2 else 'forward hook'} " \
                        "added or removed"
                return self.paths[k], _HOOK_TABLES[j % len(_HOOK_TABLES)], f"a {kind} added or removed"
        return None


def weight_reads(graph: Any) -> set[int]:
    """Storage pointers of what a captured ``ModelGraph`` reads: its weight tensors and the module's own
    tensors behind contiguous copies (``ModelGraph.weight_sources``); ``changed(reads=...)`` takes them."""
    return {t.untyped_storage().data_ptr() for t in (*graph.weight_values.values(),
                                                     *getattr(graph, "weight_sources", {}).values())}


def _show(s: Any) -> str:
    if s is _UNWATCHED:
        return "<another kind of value>"
    if isinstance(s, tuple) and len(s) == 2 and s[0] in (dict, list, tuple, set):
        text = repr(s[0](s[1]) if s[0] is not set else set(s[1]))
        return text if len(text) <= 60 else f"<a {s[0].__name__} of {len(s[1])} items>"
    if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], type) and isinstance(s[1], tuple):
        text = f"{s[0].__name__}({', '.join(f'{k}={_show(x)}' for k, x in s[1])})"  # a configuration object
        return text if len(text) <= 80 else f"<a {s[0].__name__} of {len(s[1])} fields>"
    if s == ("nan",):
        return "nan"
    return repr(s)
