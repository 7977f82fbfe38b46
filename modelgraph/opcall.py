"""Call one captured op: bind its tensor and weight refs, resolve its ATen overload, run it.

The single step both interpreters share: ``modelgraph.execute`` (running a graph or a slice) and
``modelgraph.slice`` (shape-checking a slice on the meta device). It sits below both so neither
imports the other for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from modelgraph.allowlist import resolve
from modelgraph.argcodec import TensorRef, WeightRef, bind
from modelgraph.errors import DanglingReferenceError
from modelgraph.graph import OpNode


def call_op(op: OpNode, env: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
            device: torch.device, fn: Callable | None = None):
    """Run one op with its tensor refs bound from ``env`` and weight refs from ``weights``.

    ``device`` is where bound constants (e.g. tensors built from the op's literal arguments) are put;
    ``fn`` is the already resolved ATen overload (resolved from ``op.target`` through the allowlist when
    None). Returns what the overload returns (a tensor or a tuple of them).
    Raises ``DanglingReferenceError`` when a ref is in neither mapping; errors of the op itself propagate.
    """
    def lookup(r: TensorRef | WeightRef) -> torch.Tensor:
        try:
            return env[r.name] if isinstance(r, TensorRef) else weights[r.name]
        except KeyError:
            kind = "tensor" if isinstance(r, TensorRef) else "weight"
            raise DanglingReferenceError(f"op {op.name!r} needs {kind} {r.name!r}, which is not available") from None

    args, kwargs = op.template
    return (fn or resolve(op.target))(*bind(args, lookup, device), **bind(kwargs, lookup, device))
