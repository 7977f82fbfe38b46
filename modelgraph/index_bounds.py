"""The index tensors an allowlisted op reads, checked against the tensor they index before its kernel runs.

Why: a client's slice runs on the edge server, and its index tensors (a cut tensor, an uploaded weight, a
factory such as ``arange``) are the client's to choose. ATen's index kernels do not all check them:

- On CPU, ``embedding_bag`` reads ``indices[offsets[b]]`` without checking the offsets beyond the first and
  the last: a negative or decreasing offset reads memory outside the tensor (its value came back in the
  error message) or faults the process. Session 28: a stranger's 1 KB ProfileGraph slice with offsets
  ``arange(0, -2e8, -1e8)`` killed the edge server (SIGSEGV), every tenant's session with it.
- On CUDA, an out-of-range index in ``gather``, ``scatter``, ``index_select``, ``embedding``, ``index`` or
  ``index_put`` is a device-side assert, after which the process's CUDA context is unusable: the server
  would fail every tenant's requests until restarted.

So :func:`checked` wraps each such op of a client's program (``modelgraph.execute.Program``, untrusted) with
a check of the values against the domain the CPU kernel accepts, and the op is refused with an
``IndexError`` naming the index, its value and the bound (the program names the op: INVALID_ARGUMENT at
the server) before any kernel reads. A model that eager PyTorch runs passes the check unchanged: the
domains are the CPU kernels' (``tests/test_index_bounds.py`` compares them on every op and edge).

Domains (``n`` the size of the indexed dim):

- ``index_select``, ``gather``, ``scatter`` (``.src``, ``.value``), ``scatter_add``: ``0 <= i < n``;
- ``embedding``: ``0 <= i < weight.size(0)``;
- ``embedding_bag`` (``.default``, ``.padding_idx``, ``_embedding_bag``): indices as ``embedding``; offsets
  non-negative, non-decreasing, none past ``len(indices)`` (the CPU kernel also wants the first to be 0,
  and says so itself), and at least one bag when there are indices (break29 H1: none faulted the kernel in max
  mode or with a padding index; eager's sum of no bags, an empty answer no model asks for, is refused too);
- ``index.Tensor``, ``index_put``: an integer index at dim ``d`` ``-n <= i < n``; a boolean (or uint8) mask
  covers as many dims as it has, its shape checked by the kernel on the host.

The check reads each index tensor's least and greatest value (one ``aminmax``; on CUDA one synchronisation
per such op) and skips empty and meta tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from modelgraph.allowlist import argument_binder

_DIM_INDEX = frozenset({"aten.index_select.default", "aten.gather.default", "aten.scatter.src",
                        "aten.scatter.value", "aten.scatter_add.default"})
_EMBEDDING_BAG = frozenset({"aten.embedding_bag.default", "aten.embedding_bag.padding_idx",
                            "aten._embedding_bag.default"})
_INDEX_LIST = frozenset({"aten.index.Tensor", "aten.index_put.default"})
INDEX_OPS: frozenset[str] = _DIM_INDEX | _EMBEDDING_BAG | _INDEX_LIST | {"aten.embedding.default"}
"""The allowlisted ops whose tensor arguments are indices into another argument (checked by :func:`checked`)."""


def _range(t: torch.Tensor) -> tuple[int, int] | None:
    """(least, greatest) value of an integer tensor; None when there is nothing to check (empty, meta)."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # (one synchronisation on CUDA)
    return lo, hi


def _within(what: str, t: Any, lo: int, hi: int, dim_note: str) -> None:
    """Raise IndexError unless every value of tensor ``t`` is in ``[lo, hi)``."""
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        return  # the kernel refuses a wrong dtype itself, on the host
    r = _range(t)
    if r is None:
        return
    if r[0] < lo or r[1] >= hi:
        bad = r[0] if r[0] < lo else r[1]
        raise IndexError(f"{what} holds {bad}, outside [{lo}, {hi}){dim_note}")


def _dim_size(t: torch.Tensor, dim: int) -> tuple[int, int]:
    """(the normalised dim, its size) of ``t`` (a 0-dim tensor indexes as one of size 1)."""
    nd = max(t.dim(), 1)
    if not -nd <= dim < nd:
        raise IndexError(f"dim {dim} out of range for a tensor of {t.dim()} dims")
    d = dim % nd
    return d, (t.shape[d] if t.dim() else 1)


def _check_dim_index(a: dict[str, Any]) -> None:
    self, index = a["self"], a["index"]
    d, n = _dim_size(self, a["dim"])
    _within("index", index, 0, n, f" (dim {d} of size {n})")


def _check_embedding(a: dict[str, Any]) -> None:
    n = a["weight"].shape[0] if a["weight"].dim() else 0
    _within("indices", a["indices"], 0, n, f" (the weight's {n} rows)")


def _check_embedding_bag(a: dict[str, Any]) -> None:
    _check_embedding(a)
    off, indices = a["offsets"], a["indices"]
    if not isinstance(off, torch.Tensor) or off.dim() != 1 or not isinstance(indices, torch.Tensor) \
            or off.is_floating_point():
        return  # the kernel refuses other shapes and dtypes on the host
    bags = off.numel() - (1 if a.get("include_last_offset") else 0)
    if bags <= 0 and indices.numel() > 0 and off.device.type != "meta":
        # break29 H1: no bag for the indices (empty offsets, or only the last one) faulted the CPU kernel in
        # max mode or with a padding_idx (SIGSEGV, the server killed)
        raise IndexError(f"offsets make no bag for the {indices.numel()} indices ({off.numel()} offsets"
                         f"{', the last one closing' if a.get('include_last_offset') else ''})")
    r = _range(off)  # (None: empty or meta)
    if r is None:
        return
    if r[0] < 0 or r[1] > indices.numel():
        bad = r[0] if r[0] < 0 else r[1]
        raise IndexError(f"offsets hold {bad}, outside [0, {indices.numel()}] (the {indices.numel()} indices)")
    if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
        raise IndexError("offsets must be non-decreasing (each bag starts where the one before it ends or later)")


def _check_index_list(a: dict[str, Any]) -> None:
    self, d = a["self"], 0
    for k, idx in enumerate(a["indices"]):
        if idx is None:
            d += 1
            continue
        if not isinstance(idx, torch.Tensor):
            return  # the kernel refuses it
        if idx.dtype in (torch.bool, torch.uint8):  # a mask: as many dims as it has, none for a 0-dim one (its
            d += idx.dim()  # shape the kernel checks on the host)
            continue
        if d >= self.dim():
            return  # too many indices: the kernel refuses it on the host
        n = self.shape[d]
        _within(f"indices[{k}]", idx, -n, n, f" (dim {d} of size {n})")
        d += 1


_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    **dict.fromkeys(_DIM_INDEX, _check_dim_index),
    "aten.embedding.default": _check_embedding,
    **dict.fromkeys(_EMBEDDING_BAG, _check_embedding_bag),
    **dict.fromkeys(_INDEX_LIST, _check_index_list),
}


def checked(target: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (the kernel of the op ``target``, an ``aten.<packet>.<overload>`` name) with its index tensors'
    values checked before it runs (module docstring); ``fn`` itself for an op that reads no index tensor.

    The wrapper takes the op's arguments as the kernel does (positional in schema order, or by name) and
    raises IndexError, before calling ``fn``, when an index is outside its domain; what the check does
    not cover (dtypes, shapes, a dim out of range) it leaves to the kernel. (A client's program passes the
    embedding bags' index arguments contiguous first: ``runtime_guards._DENSE_ARGUMENTS``.)"""
    check = _CHECKS.get(target)
    if check is None:
        return fn
    bind = argument_binder(target)

    def run(*args: Any, **kwargs: Any) -> Any:
        check(bind(args, kwargs))
        return fn(*args, **kwargs)

    run.__name__ = f"checked_{target.split('.')[1]}"
    return run
