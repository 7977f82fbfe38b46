"""JSON encoding of ATen call arguments: tensors by name, weights by name, plain scalars and lists.

This is the whole vocabulary a slice may use. Anything else (a Python object, a callable, a tensor
value inlined in the arguments) is refused, on the way out and on the way in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

    def walk(v: Any) -> None:
        if isinstance(v, TensorRef | WeightRef):
            out.append(v)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(template)
    return out


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
