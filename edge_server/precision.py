"""The UE's float32 matmul precision, applied to its request's ops on this server (break38 F2).

``torch.set_float32_matmul_precision("medium")`` on the UE makes its CPU float32 matmuls bfloat16-precise on a CPU
with AMX / AVX-512 BF16 (0.15 off on a 64x256 @ 256x64 product on this project's machines), and the user's eager
module follows it; a server in its own process computed at "highest", so offloaded answers were 1.6e-3 off
``model(x)``. The client now sends its setting with each request (``BeginRequest.matmul_precision``; empty, from an
older client: "highest") and the worker that runs a request's ops holds it (:data:`GATE`).

torch's setting is process-wide, not per thread: a worker runs a batch of a request's ops under
``GATE.hold(precision)``, which sets it while no other worker holds another value (workers holding the same value
run together; one wanting another waits for them, and newcomers for the held value wait behind it: at most the
holders' batch time slices) and puts the process's own value back once the last holder is done. Only on a CPU
server: on CUDA the precision is the operator's (``coinfer-edge serve --tf32``, which the same setting would
override).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")
"""What ``torch.set_float32_matmul_precision`` takes: the only values a BeginRequest may carry."""


def matmul_precision(value: str) -> str:
    """``BeginRequest.matmul_precision`` checked: "" (an older client) is "highest"; one of
    :data:`MATMUL_PRECISIONS` is itself. Raises ValueError naming the value (at most 40 characters) otherwise."""
    if not value:
        return "highest"
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision {value[:40]!r} is not one of {', '.join(MATMUL_PRECISIONS)}")
    return value


_BATCHED_PRODUCTS = frozenset({"aten.bmm.default", "aten.baddbmm.default"})


def has_batched_products(ops, ranks: Mapping[str, int] | None = None) -> bool:
    """Whether any of ``ops`` (a slice's ``OpNode``s) is a batched matrix product: ``bmm``, ``baddbmm``, or a
    ``matmul`` whose output or any operand has rank >= 3. ``ranks``: the rank of each tensor and weight the ops read
    that no op of ``ops`` makes (the slice's cut tensors and weights, by ref / name); an operand of unknown rank
    counts as batched.

    By operand, not only by output (break44 F3): ``matmul`` of a 1-D [64] by a [1M, 64, 1] answers a rank-2 [1M, 1]
    and runs as a million thin products, at "medium" 690 ms a call against 28 ms at "highest", another tenant's median
    597 ms beside it. A 3-D-by-2-D ``matmul`` ATen folds into one ``mm`` is counted too (it runs at "highest", as
    a ``bmm`` slice does)."""
    known: dict[str, int] = dict(ranks or {})
    for op in ops:
        if op.target in _BATCHED_PRODUCTS:
            return True
        if op.target == "aten.matmul.default":
            if op.outputs and len(op.outputs[0].shape) >= 3:
                return True
            if any(known.get(r, 3) >= 3 for r in (*op.tensor_inputs, *op.weight_inputs)):
                return True
        for r, m in zip(op.output_refs(), op.outputs, strict=False):
            known[r] = len(m.shape)
    return False


def served_precision(requested: str, batched_products: bool) -> str:
    """The precision a request's ops run under: ``requested``, except "highest" for a slice with batched matrix
    products (``has_batched_products``). break42 F1: at "medium" a CPU ``bmm`` of many thin matrices runs 13-38x
    slower than at "highest" (bfloat16 conversions per matrix: 127-430 ns per 1 x K x 1 product for K = 1-64, 70 us at
    K = 4096, against 5-21 ns and 9 us), which the op budget, checked once per slice without a precision, prices as
    FLOPs at the large-product rate: one tenant's 2 KB slice held the only compute worker 1.1-1.3 s a request and
    every other tenant's requests waited (1098 ms median against 16 ms beside the same slice at "highest"). So a
    client's precision reaches only slices without batched products (an MLP, a CNN, linear layers); one with them
    runs at "highest" and answers ~1e-3 off a "medium" UE's own run (README Known limitations)."""
    return "highest" if batched_products and requested != "highest" else requested


class PrecisionGate:
    """Holders of one float32 matmul precision at a time (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holders = 0
        self._held: str | None = None
        self._saved = "highest"
        self._next: str | None = None
        """The value the oldest worker waiting for another precision than the one held wants: newcomers for the held
        value wait behind it, and it goes first once the holders are done (break42 F2: holders of one value kept
        arriving and a waiter for another waited 3 s). None: nobody waits for another value."""

    @contextlib.contextmanager
    def hold(self, precision: str, device: torch.device | str = "cpu") -> Iterator[None]:
        """Run the body with torch's float32 matmul precision at ``precision`` (one of :data:`MATMUL_PRECISIONS`);
        on a non-CPU ``device`` nothing is changed."""
        if torch.device(device).type != "cpu":
            yield
            return
        with self._cond:
            while (self._holders and (self._held != precision or self._next is not None)) or (
                    not self._holders and self._next not in (None, precision)):
                if self._next is None and self._held != precision:
                    self._next = precision
                self._cond.wait()
            if self._next == precision:
                self._next = None
                self._cond.notify_all()  # the others waiting for it may follow it in
            if not self._holders:
                self._saved = torch.get_float32_matmul_precision()
                if self._saved != precision:
                    torch.set_float32_matmul_precision(precision)
                self._held = precision
            self._holders += 1
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                if not self._holders:
                    if self._saved != self._held and torch.get_float32_matmul_precision() == self._held:
                        torch.set_float32_matmul_precision(self._saved)
                    self._held = None
                    self._cond.notify_all()


GATE = PrecisionGate()
"""The process's gate: every worker running a request's ops holds it (``edge_server.requests.run_batch``)."""
