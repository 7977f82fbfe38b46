"""Compare model results as the user sees them: same Python structure, then the tensors' values.

Results are pytrees (tensors, tuples, lists, dicts, ``None`` and other constants). Two results agree
when their structures are equal (same containers, keys, order and non-tensor leaves), every tensor
pair has the same dtype and shape, and the values are within a tolerance.

Tolerances (``TOLERANCES``): against the captured graph the split runtime must be exact on CPU
(0: the same ATen kernels run on both sides). Against the user's eager module the captured graph may
differ slightly (``run_decompositions`` can pick other kernels, e.g. a decomposed LSTM or softmax):
|a - b| <= atol + rtol * |b| with atol = rtol = 1e-4 for float32/float64 (and complex) and 1e-2 for
float16/bfloat16, the tolerance ``modelgraph.capture`` checks the graph against the module with at
capture time; integer and bool tensors must be equal.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ue_client.errors import CoinferError

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-4, 1e-4),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
    torch.complex64: (1e-4, 1e-4),
    torch.complex128: (1e-4, 1e-4),
}
"""dtype -> (rtol, atol) for eager-vs-captured comparisons (the same as the capture-time check)."""


class ResultMismatch(CoinferError, ValueError):
    """Two results differ in structure, in a tensor's dtype or shape, or in a non-tensor leaf."""


def _flat(x: Any) -> tuple[list[Any], pytree.TreeSpec]:
    return pytree.tree_flatten(x)


def structure(x: Any) -> str:
    """A short text of a result's structure, tensors shown as ``T``: e.g. ``{'logits': T, 'feat': T}``."""
    leaves, spec = _flat(x)
    return str(pytree.tree_unflatten(["T" if isinstance(v, torch.Tensor) else v for v in leaves], spec))


def _diff(a: torch.Tensor, b: torch.Tensor, where: str) -> float:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        raise ResultMismatch(f"{where}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}")
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_complex():
        d = (a.to(torch.complex128) - b.to(torch.complex128)).abs()
    elif a.dtype == torch.bool:
        d = (a != b).to(torch.float64)
    else:
        d = (a.to(torch.float64) - b.to(torch.float64)).abs()
    if a.is_floating_point() or a.is_complex():
        both_nan = torch.isnan(a) & torch.isnan(b) if not a.is_complex() else a.isnan() & b.isnan()
        d = torch.where(both_nan, torch.zeros_like(d), d)
        d = torch.nan_to_num(d, nan=math.inf)
    return float(d.max())


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over all tensor leaves of two results of the same structure (0.0 when equal).

    Raises ``ResultMismatch`` when the structures, a tensor's dtype or shape, or a non-tensor leaf
    differ. NaN in the same place of both counts as equal; NaN against a number as infinity.
    """
    la, sa = _flat(a)
    lb, sb = _flat(b)
    if sa != sb:
        raise ResultMismatch(f"result structures differ: {structure(a)} vs {structure(b)}")
    worst = 0.0
    for i, (x, y) in enumerate(zip(la, lb)):
        tx, ty = isinstance(x, torch.Tensor), isinstance(y, torch.Tensor)
        if tx and ty:
            worst = max(worst, _diff(x, y, f"leaf {i}"))
        elif tx or ty or x != y:
            raise ResultMismatch(f"leaf {i} differs: {x!r} vs {y!r}"[:300])
    return worst


def within_tolerance(a: Any, b: Any) -> bool:
    """``a`` matches the reference ``b`` within ``TOLERANCES`` (exact for integer and bool tensors).

    Raises ``ResultMismatch`` as ``max_abs_diff`` does for a different structure."""
    la, sa = _flat(a)
    lb, sb = _flat(b)
    if sa != sb:
        raise ResultMismatch(f"result structures differ: {structure(a)} vs {structure(b)}")
    for i, (x, y) in enumerate(zip(la, lb)):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or x != y:
                return False
            continue
        d = _diff(x, y, f"leaf {i}")
        rtol, atol = TOLERANCES.get(x.dtype, (0.0, 0.0))
        if d == 0.0:
            continue
        if rtol == 0.0 and atol == 0.0:
            return False
        ok = torch.isclose(x.detach().cpu(), y.detach().cpu(), rtol=rtol, atol=atol, equal_nan=True)
        if not bool(ok.all()):
            return False
    return True


__all__ = ["TOLERANCES", "ResultMismatch", "max_abs_diff", "structure", "within_tolerance"]
