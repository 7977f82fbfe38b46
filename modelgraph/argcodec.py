"""JSON encoding of ATen call arguments: tensors by name, weights by name, plain scalars and lists.

This is the whole vocabulary a slice may use. Anything else (a Python object, a callable, a tensor
value inlined in the arguments) is refused, on the way out and on the way in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from modelgraph.errors import MalformedSliceError
from modelgraph.tensors import DTYPES, dtype_name

_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}
MAX_LIST = 1 << 16
MAX_DEPTH = 8


@dataclass(frozen=True)
class TensorRef:
    name: str


@dataclass(frozen=True)
class WeightRef:
    name: str


def encode(value: Any, ref_of: Callable[[Any], dict]) -> Any:
    """Encode a captured argument; ``ref_of`` turns an fx.Node into {"t": ...} or {"w": ...}."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"f": repr(value)}
    if isinstance(value, list | tuple):
        return [encode(v, ref_of) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": None}  # the executing side's device
    if isinstance(value, torch.layout):
        return {"layout": "strided"}
    if isinstance(value, torch.memory_format):
        for k, v in _MEMORY_FORMATS.items():
            if v == value:
                return {"memory_format": k}
    if type(value).__name__ == "Node":
        return ref_of(value)
    raise MalformedSliceError(f"cannot encode argument of type {type(value).__name__}: {value!r}"[:200])


_PLAIN = frozenset({type(None), bool, int, str, float})


def decode(value: Any, depth: int = 0) -> Any:
    """Decode JSON arguments into a template whose tensors/weights are TensorRef/WeightRef leaves."""
    if depth > MAX_DEPTH:
        raise MalformedSliceError("argument nesting too deep")
    tp = type(value)
    if tp in _PLAIN:  # exact JSON types first (the common case of a long slice: one ref, a few ints)
        return value
    if tp is dict and len(value) == 1:
        k = next(iter(value))
        v = value[k]
        if k == "t" and type(v) is str:
            return TensorRef(v)
        if k == "w" and type(v) is str:
            return WeightRef(v)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise MalformedSliceError(f"argument list of {len(value)} items is too long")
        return [decode(v, depth + 1) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (k, v), = value.items()
        if k == "t" and isinstance(v, str):
            return TensorRef(v)
        if k == "w" and isinstance(v, str):
            return WeightRef(v)
        if k == "f" and v in ("inf", "-inf", "nan"):
            return float(v)
        if k == "dtype" and v in DTYPES:
            return DTYPES[v]
        if k == "device" and v is None:
            return _DEVICE
        if k == "layout" and v in _LAYOUTS:
            return _LAYOUTS[v]
        if k == "memory_format" and v in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[v]
    raise MalformedSliceError(f"unrecognised argument encoding {value!r}"[:200])


class _DeviceSlot:
    """Placeholder for 'the device this op runs on', filled in at execution."""

    def __repr__(self) -> str:
        return "<exec device>"


_DEVICE = _DeviceSlot()


def refs(template: Any) -> list[TensorRef | WeightRef]:
    """All tensor/weight references in a decoded template, in argument order."""
    out: list[TensorRef | WeightRef] = []
    _walk_refs(template, out)  # a module function: a nested one that calls itself is a reference cycle
    return out


def _walk_refs(v: Any, out: list) -> None:
    if isinstance(v, TensorRef | WeightRef):
        out.append(v)
    elif isinstance(v, list):
        for x in v:
            _walk_refs(x, out)
    elif isinstance(v, dict):
        for x in v.values():
            _walk_refs(x, out)


# ---- call forms: decode + refs + a hashable image, in one walk ---------------------------------
class _Tag:
    """A marker inside a call skeleton. Compared by identity, so no JSON value can equal one."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label

    def __repr__(self) -> str:
        return f"<{self.label}>"


_T_REF, _W_REF, _FLOAT, _BOOL, _LIST, _OTHER = (_Tag(x) for x in ("tensor", "weight", "float", "bool", "list", "obj"))

class CallForm(NamedTuple):
    """One op's arguments decoded, with what validation needs of them, from one walk (:func:`analyse`).

    ``skeleton`` is a hashable image of the decoded arguments with each reference replaced by its slot:
    ``(tag, i)`` for the i-th distinct tensor (or weight) the call reads, first occurrence first. Two
    calls with equal skeletons, the same tensor at each tensor slot and the same weight at each weight
    slot are the same call, argument for argument: scalars are tagged by type (``1``, ``1.0`` and
    ``True`` differ; floats by ``repr``, so ``0.0`` and ``-0.0`` differ), lists are tagged, and an
    argument read twice (``add(x, x)``) differs from two equal tensors (``add(x, y)``).
    """

    args: list
    """Decoded positional arguments (TensorRef/WeightRef leaves), as :func:`decode` gives them."""
    kwargs: dict
    refs: tuple[TensorRef | WeightRef, ...]
    """Every reference in argument order (repeats kept), as :func:`refs` gives them."""
    skeleton: tuple
    tensors: tuple[str, ...]
    """The tensor slots: distinct tensor refs, first occurrence first."""
    weights: tuple[str, ...]
    """The weight slots: distinct weight names, first occurrence first."""


_new_object = object.__new__


def _tensor_ref(name: str) -> TensorRef:
    """``TensorRef(name)`` without the frozen dataclass's ``object.__setattr__`` (one per op of a slice)."""
    r = _new_object(TensorRef)
    r.__dict__["name"] = name
    return r


_T_LEAVES = tuple((_T_REF, i) for i in range(16))  # shared skeleton leaves of the first tensor slots


def _slot(slots: dict[str, int], name: str) -> int:
    i = slots.get(name)
    if i is None:
        i = slots[name] = len(slots)
    return i


def _analyse(value: Any, depth: int, ts: dict, ws: dict, out: list) -> tuple[Any, Any]:
    """(decoded value, skeleton) of one argument; raises MalformedSliceError exactly as :func:`decode`.
    ``ts``/``ws``: tensor/weight slots so far (name -> index); ``out``: references so far."""
    if depth > MAX_DEPTH:
        raise MalformedSliceError("argument nesting too deep")
    tp = type(value)
    if tp is int or tp is str or value is None:
        return value, value
    if tp is dict and len(value) == 1:
        k = next(iter(value))
        v = value[k]
        if isinstance(v, str):
            if k == "t":
                r = _tensor_ref(v)
                out.append(r)
                i = _slot(ts, v)
                return r, _T_LEAVES[i] if i < 16 else (_T_REF, i)
            if k == "w":
                r = WeightRef(v)
                out.append(r)
                return r, (_W_REF, _slot(ws, v))
    if tp is float:
        return value, (_FLOAT, repr(value))
    if tp is bool:
        return value, (_BOOL, value)
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise MalformedSliceError(f"argument list of {len(value)} items is too long")
        pairs = [_analyse(x, depth + 1, ts, ws, out) for x in value]
        return [d for d, _ in pairs], (_LIST, *[s for _, s in pairs])
    d = decode(value, depth)  # a leaf: a scalar subclass, an encoded float/dtype/device/layout/format, or an error
    if type(d) is float:
        return d, (_FLOAT, repr(d))
    return d, (_OTHER, type(d), d)


def analyse(args: tuple | list, kwargs: Mapping[str, Any]) -> CallForm:
    """Decode an op's JSON arguments (``args`` as one list, each kwarg value on its own, as
    ``OpNode.template`` does) and collect its references, tensor/weight slots and call skeleton in the
    same walk.

    Raises MalformedSliceError for anything :func:`decode` refuses (same messages)."""
    if len(args) > MAX_LIST:
        raise MalformedSliceError(f"argument list of {len(args)} items is too long")
    ts: dict[str, int] = {}
    ws: dict[str, int] = {}
    out: list[TensorRef | WeightRef] = []
    a, ask = [], []
    for v in args:
        if type(v) is dict and len(v) == 1 and type(v.get("t")) is str:  # the common case: a tensor
            name = v["t"]
            r = _tensor_ref(name)
            out.append(r)
            i = ts.get(name)
            if i is None:
                i = ts[name] = len(ts)
            a.append(r)
            ask.append(_T_LEAVES[i] if i < 16 else (_T_REF, i))
            continue
        d, s = _analyse(v, 1, ts, ws, out)
        a.append(d)
        ask.append(s)
    k: dict[str, Any] = {}
    ksk = []
    for key, v in kwargs.items():
        d, s = _analyse(v, 0, ts, ws, out)
        k[key] = d
        ksk.append((key, s))
    return CallForm(a, k, tuple(out), (tuple(ask), tuple(ksk) if ksk else ()), tuple(ts), tuple(ws) if ws else ())


def bind(template: Any, lookup: Callable[[TensorRef | WeightRef], torch.Tensor], device: torch.device) -> Any:
    """Replace references with tensors and the device slot with ``device``."""
    if isinstance(template, TensorRef | WeightRef):
        return lookup(template)
    if isinstance(template, list):
        return [bind(v, lookup, device) for v in template]
    if isinstance(template, dict):
        return {k: bind(v, lookup, device) for k, v in template.items()}
    if template is _DEVICE:
        return device
    return template

