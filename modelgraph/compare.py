"""One tensor comparison for captured-graph results: the tolerance table and the per-tensor check.

Used by the capture-time check of a graph against the user's eager module (``modelgraph.capture``)
and by ``--verify`` / the tests (``ue_client.verify``), so both apply the same bound.

Tolerances (``TOLERANCES``, dtype -> (rtol, atol)): ``|a - ref| <= atol + rtol * |ref|`` elementwise
(``torch.isclose``), with atol = rtol = 1e-4 for float32/float64 and complex, 1e-2 for float16/bfloat16;
integer and bool tensors must be equal. NaN in the same place of both counts as equal. The graph may
differ from the eager module within this bound because ``run_decompositions`` can pick other kernels
(a decomposed LSTM or softmax); against the captured graph itself the split runtime is exact on CPU.
"""

from __future__ import annotations

import math

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-4, 1e-4),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
    torch.complex64: (1e-4, 1e-4),
    torch.complex128: (1e-4, 1e-4),
}
"""dtype -> (rtol, atol); a dtype not listed (integers, bool) must match exactly."""


def tensor_max_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |a - ref| (float64 arithmetic; complex: modulus) of two tensors of the same dtype and shape
    (the caller checks those); 0.0 for empty tensors. NaN in the same place of both counts as 0, NaN
    against a number as infinity; bool tensors count a mismatch as 1."""
    if a.numel() == 0:
        return 0.0
    a, ref = a.detach().cpu(), ref.detach().cpu()
    if a.is_complex():
        d = (a.to(torch.complex128) - ref.to(torch.complex128)).abs()
    elif a.dtype == torch.bool:
        d = (a != ref).to(torch.float64)
    else:
        d = (a.to(torch.float64) - ref.to(torch.float64)).abs()
    if a.is_floating_point() or a.is_complex():
        d = torch.where(a.isnan() & ref.isnan(), torch.zeros_like(d), d)
        d = torch.nan_to_num(d, nan=math.inf)
    return float(d.max())


def tensor_within_tolerance(a: torch.Tensor, ref: torch.Tensor) -> bool:
    """``a`` matches ``ref`` (same dtype and shape) within ``TOLERANCES`` of their dtype; exact for the
    dtypes not listed."""
    rtol, atol = TOLERANCES.get(a.dtype, (0.0, 0.0))
    if rtol == 0.0 and atol == 0.0:
        return tensor_max_diff(a, ref) == 0.0
    if a.numel() == 0:
        return True
    return bool(torch.isclose(a.detach().cpu(), ref.detach().cpu(), rtol=rtol, atol=atol, equal_nan=True).all())


__all__ = ["TOLERANCES", "tensor_max_diff", "tensor_within_tolerance"]
