"""Compare model results as the user sees them: same Python structure, then the tensors' values.

Results are pytrees (tensors, tuples, lists, dicts, ``None`` and other constants). Two results agree
when their structures are equal (same containers, keys, order and non-tensor leaves), every tensor
pair has the same dtype and shape, and the values are within a tolerance.

Tolerances (``TOLERANCES``, defined once in ``modelgraph.compare``, the bound ``modelgraph.capture``
checks the graph against the module with at capture time): against the captured graph the split
runtime must be exact on CPU (0: the same ATen kernels run on both sides). Against the user's eager
module the captured graph may differ slightly (``run_decompositions`` can pick other kernels, e.g. a
decomposed LSTM or softmax): |a - b| <= atol + rtol * |b| with atol = rtol = 1e-4 for float32/float64
(and complex) and 1e-2 for float16/bfloat16; integer and bool tensors must be equal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from modelgraph.compare import TOLERANCES, tensor_max_diff, tensor_within_tolerance
from ue_client.errors import CoinferError


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
    return tensor_max_diff(a, b)


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
        _diff(x, y, f"leaf {i}")  # same dtype and shape, or ResultMismatch
        if not tensor_within_tolerance(x, y):
            return False
    return True


__all__ = ["TOLERANCES", "ResultMismatch", "max_abs_diff", "structure", "within_tolerance"]
