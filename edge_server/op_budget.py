"""What one op of a client's slice will cost before it runs: FLOPs, kernel scratch and peak memory.

Shape propagation on meta tensors proves that a slice's declared tensors are consistent, but a
kernel can need far more memory than its declared tensors: a float64 ``conv2d`` on the CPU takes the
im2col path and allocates ``N x (C/g * prod(k)) x prod(out)`` elements of scratch (a 4 MiB
declaration can ask for gigabytes), and the math path of scaled dot-product attention materialises
the ``L x S`` score matrix per head. This module estimates, per op kind and from the validated
metadata only, the op's FLOPs and its scratch bytes (upper bounds, conservative where the kernel's
choice of algorithm is not known), and the slice's peak of live bytes when run in order with
last-use frees. :func:`check_slice_budget` refuses a slice whose op would exceed the scratch limit
or the per-op time budget (FLOPs / the device's measured rate) with :class:`OpOverBudget`
(RESOURCE_EXHAUSTED), before anything runs.

Conventions: FLOPs count a multiply-add as 2; bytes are bytes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from edge_server.errors import ResourceExhausted
from modelgraph import SliceSpec, TensorMeta
from modelgraph.argcodec import TensorRef, WeightRef, bind
from modelgraph.graph import OpNode

logger = logging.getLogger(__name__)

GiB = 1 << 30

__all__ = [
    "OpCost",
    "OpLimits",
    "OpOverBudget",
    "SliceCost",
    "check_slice_budget",
    "estimate_op",
    "estimate_slice",
    "measure_device_flops",
]


class OpOverBudget(ResourceExhausted):
    """An op of the slice would need more scratch memory or time than the server allows one op."""


@dataclass(frozen=True, slots=True)
class OpLimits:
    """Per-op bounds (the server derives them from ``--memory-mb`` and ``--op-time-ms``)."""

    max_workspace_bytes: int = 2 * GiB
    """Scratch bytes one op may take beyond its inputs and declared outputs."""
    max_op_ms: float = 2000.0
    """Time one op may take, estimated as FLOPs / ``device_flops``."""
    device_flops: float = 5e9
    """FLOP/s of the device for float32 (measured at start by :func:`measure_device_flops`)."""
    max_peak_bytes: int = 0
    """Bound on the slice's estimated peak of live bytes while it runs (0: not checked here)."""

    @property
    def max_flops(self) -> float:
        return self.max_op_ms / 1e3 * self.device_flops


@dataclass(frozen=True, slots=True)
class OpCost:
    flops: float
    """Floating-point operations (multiply-add = 2), scaled for slow dtypes (float64 x2, complex x4)."""
    workspace_bytes: int
    """Scratch the kernel may allocate beyond the op's inputs and declared outputs (upper bound)."""


@dataclass(frozen=True, slots=True)
class SliceCost:
    ops: tuple[OpCost, ...]
    """Per op, in execution order."""
    peak_bytes: int
    """Largest sum of live cut tensors + intermediates + one op's output and scratch (weights excluded)."""
    weight_bytes: int
    total_flops: float


def measure_device_flops(device: torch.device, *, n: int = 256, repeats: int = 3) -> float:
    """float32 matmul FLOP/s of ``device`` (best of ``repeats`` n x n x n products; floor 1 GFLOP/s).

    Takes a few milliseconds. The floor keeps a loaded machine at start-up from refusing ordinary ops.
    """
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    best = math.inf
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return max(2.0 * n**3 / max(best, 1e-9), 1e9)


def _numel(m: TensorMeta) -> int:
    return math.prod(m.shape)


def _itemsize(m: TensorMeta) -> int:
    return m.itemsize


def _dtype_factor(m: TensorMeta) -> float:
    dt = m.dtype
    if dt.startswith("complex"):
        return 4.0
    if dt == "float64":
        return 2.0
    return 1.0


def _short(target: str) -> str:
    """``aten.conv2d.default`` -> ``conv2d``."""
    parts = target.split(".")
    return parts[1] if len(parts) >= 2 else target


def _arg(args: list, kwargs: Mapping, i: int, name: str, default):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _ints(v, n: int) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return [v] * n
    if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
        return (list(v) * n)[:n] if len(v) == 1 else list(v)[:n]
    return [1] * n


_VIEWS = frozenset(
    {
        "view",
        "_unsafe_view",
        "permute",
        "transpose",
        "t",
        "expand",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "narrow",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "alias",
        "detach",
        "unflatten",
    }
)
_FAST_CONV_DTYPES = frozenset({"float32", "bfloat16", "float16"})


def _conv(name: str, args: list, kwargs: Mapping, out: TensorMeta, device: torch.device) -> OpCost:
    x, w = args[0], args[1]
    if not isinstance(x, TensorMeta) or not isinstance(w, TensorMeta) or len(w.shape) < 3:
        return OpCost(0.0, 0)
    nsp = len(w.shape) - 2
    if name == "convolution":
        transposed = bool(_arg(args, kwargs, 6, "transposed", False))
        groups = _arg(args, kwargs, 8, "groups", 1)
    elif name.startswith("conv_transpose"):
        transposed = True
        groups = _arg(args, kwargs, 6, "groups", 1)
    else:
        transposed = False
        groups = _arg(args, kwargs, 6, "groups", 1)
    groups = groups if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 else 1
    ksize = math.prod(w.shape[2:])
    batch = x.shape[0] if len(x.shape) == nsp + 2 else 1
    in_sp = math.prod(x.shape[-nsp:]) if nsp else 1
    out_sp = math.prod(out.shape[-nsp:]) if nsp else 1
    if transposed:  # weight [C_in, O/g, *k]: every input pixel scatters a (O/g * k) column
        cols = batch * (w.shape[1]) * ksize * in_sp * groups
        flops = 2.0 * batch * w.shape[0] * in_sp * w.shape[1] * ksize
    else:  # weight [O, C/g, *k]: every output pixel gathers a (C/g * k) column
        cols = batch * w.shape[1] * ksize * out_sp * groups
        flops = 2.0 * batch * w.shape[0] * out_sp * w.shape[1] * ksize
    item = _itemsize(x)
    fast = device.type == "cpu" and x.dtype in _FAST_CONV_DTYPES and not transposed
    if fast:
        # oneDNN: direct/winograd kernels; scratch is reordered copies of input, weight and output
        ws = x.nbytes + w.nbytes + out.nbytes
    else:
        # im2col / col2im (slow_conv2d, slow_conv3d, slow_conv_transpose, cuDNN's GEMM algorithms)
        ws = cols * item + (out.nbytes if groups > 1 else 0)
    return OpCost(flops * _dtype_factor(x), int(ws))


def _matmul(name: str, args: list, out: TensorMeta) -> OpCost:
    if name == "linear":
        x, w = args[0], args[1]
        if not isinstance(x, TensorMeta) or not isinstance(w, TensorMeta) or not x.shape:
            return OpCost(0.0, 0)
        k = x.shape[-1]
        n = w.shape[0] if len(w.shape) == 2 else 1
        rows = _numel(x) // max(k, 1)
        return OpCost(2.0 * rows * k * n * _dtype_factor(x), 0)
    if name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
    else:
        a, b = args[0], args[1]
    if not isinstance(a, TensorMeta) or not isinstance(b, TensorMeta) or not a.shape or not b.shape:
        return OpCost(0.0, 0)
    ash = a.shape if len(a.shape) > 1 else (1, *a.shape)
    bsh = b.shape if len(b.shape) > 1 else (*b.shape, 1)
    m, k, n = ash[-2], ash[-1], bsh[-1]
    try:
        batch_shape = torch.broadcast_shapes(ash[:-2], bsh[:-2])
    except RuntimeError:
        batch_shape = ()
    batch = math.prod(batch_shape)
    item = _itemsize(a)
    # broadcasting expands (and non-contiguous operands are copied) before the GEMM
    ws = (batch * m * k + batch * k * n) * item
    return OpCost(2.0 * batch * m * k * n * _dtype_factor(a), int(ws))


def _sdpa(args: list, out: TensorMeta) -> OpCost:
    q, k, v = ([*args, None, None, None])[:3]
    if not all(isinstance(t, TensorMeta) and len(t.shape) >= 2 for t in (q, k, v)):
        return OpCost(0.0, 0)
    seq_q, e = q.shape[-2], q.shape[-1]
    seq_k, ev = k.shape[-2], v.shape[-1]
    try:
        batch = math.prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    except RuntimeError:
        batch = math.prod(q.shape[:-2])
    scores = batch * seq_q * seq_k
    flops = 2.0 * scores * e + 2.0 * scores * ev + 5.0 * scores
    # the math path holds the scores, their softmax and a mask/scaled copy at once
    ws = 3 * scores * max(_itemsize(q), 4)
    return OpCost(flops * _dtype_factor(q), int(ws))


def _pool(args: list, kwargs: Mapping, out: TensorMeta, *, copies: bool = False) -> OpCost:
    """``copies``: the executor runs it on channels-last copies of its input and output
    (``modelgraph.execute.max_pool2d_channels_last``), scratch of one input and one output."""
    x = args[0] if args else kwargs.get("self")
    nsp = max(len(out.shape) - 2, 1)
    k = _ints(_arg(args, kwargs, 1, "kernel_size", 1), nsp)
    ws = (_numel(x) * _itemsize(x) + _numel(out) * _itemsize(out)) if copies and isinstance(x, TensorMeta) else 0
    return OpCost(float(_numel(out) * math.prod(k)) + (_numel(x) if isinstance(x, TensorMeta) else 0), ws)


def estimate_op(
    op: OpNode, args: list, kwargs: Mapping, outputs: tuple[TensorMeta, ...], device: torch.device
) -> OpCost:
    """FLOPs and scratch of one op whose tensor arguments are given as their (validated) metadata.

    ``args``/``kwargs``: the op's decoded arguments with every tensor replaced by its TensorMeta.
    Ops without a rule cost one pass over their inputs and outputs and no scratch.
    """
    name = _short(op.target)
    out = outputs[0] if outputs else TensorMeta((), "float32")
    if name.startswith("conv"):
        return _conv(name, args, kwargs, out, device)
    if name in ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear"):
        return _matmul(name, args, out)
    if name == "scaled_dot_product_attention":
        return _sdpa(args, out)
    if "pool" in name and "adaptive" not in name:
        return _pool(args, kwargs, out, copies=name == "max_pool2d" and len(out.shape) == 4)
    tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, TensorMeta)]
    for a in [*args, *kwargs.values()]:
        if isinstance(a, list):
            tensors.extend(t for t in a if isinstance(t, TensorMeta))
    touched = sum(_numel(t) for t in tensors) + sum(_numel(m) for m in outputs)
    per = 8.0 if ("norm" in name or "softmax" in name or name in ("var", "std", "gelu", "erf")) else 1.0
    factor = _dtype_factor(out) if outputs else 1.0
    return OpCost(per * touched * factor, 0)


def estimate_slice(spec: SliceSpec, order: tuple[OpNode, ...], device: torch.device) -> SliceCost:
    """Per-op costs and the peak of live bytes of a validated slice run in ``order``.

    Live bytes: the cut tensors, then each op's outputs (views count nothing) until their last
    reader ran (outputs of the slice stay); at each op the peak also holds that op's scratch.
    Weights are reported apart (the store holds them for requests; profiling makes random ones).
    Linear in the slice size: an op's cost depends only on its target, its arguments and the metadata
    of its tensors, so ops with the same call skeleton (``OpNode.call_skeleton``: arguments with
    type-tagged scalars, references as slots), the same metadata object at each tensor and weight slot
    and the same output metadata objects share one estimate (metadata keyed by object identity: the
    parser shares one object per distinct metadata, every object is alive while this runs, and a miss
    is only slower).
    """
    metas: dict[str, TensorMeta] = dict(spec.inputs)
    weights = {k: w.meta for k, w in spec.weights.items()}
    last: dict[str, int] = {}  # ref -> position of its last reader
    for i, op in enumerate(order):
        for r in op.tensor_inputs:
            last[r] = i
        if op.multi:
            for r, m in zip(op.output_refs(), op.outputs):
                metas[r] = m
        else:
            metas[op.name] = op.outputs[0]
    tensor_meta, weight_meta = metas.__getitem__, weights.__getitem__

    def lookup(ref: TensorRef | WeightRef) -> TensorMeta:
        return metas[ref.name] if isinstance(ref, TensorRef) else weights[ref.name]

    keep = set(spec.outputs)
    sizes: dict[str, int] = {r: m.nbytes for r, m in spec.inputs.items()}
    live = sum(sizes.values())
    peak = live
    costs: list[OpCost] = []
    dev = torch.device(device)
    memo: dict[tuple, OpCost] = {}
    views: dict[str, bool] = {}
    for i, op in enumerate(order):
        outs = op.outputs
        ws = op.weight_inputs
        key = (
            op.target,
            op.call_skeleton,
            tuple(map(id, map(tensor_meta, op.tensor_inputs))),
            tuple(map(id, map(weight_meta, ws))) if ws else (),
            tuple(map(id, outs)),
        )
        cost = memo.get(key)
        if cost is None:
            a, k = op.template
            cost = memo[key] = estimate_op(op, bind(a, lookup, dev), bind(k, lookup, dev), outs, dev)
        costs.append(cost)
        view = views.get(op.target)
        if view is None:
            view = views[op.target] = op.target.split(".")[1] in _VIEWS if "." in op.target else False
        out_bytes = 0 if view else (outs[0].nbytes if len(outs) == 1 else sum(m.nbytes for m in outs))
        if op.multi:
            for r, m in zip(op.output_refs(), outs):
                sizes[r] = 0 if view else m.nbytes
        else:
            sizes[op.name] = 0 if view else outs[0].nbytes
        now = live + out_bytes + cost.workspace_bytes
        if now > peak:
            peak = now
        live += out_bytes
        for r in op.tensor_inputs:  # free what this op read last (the slice's outputs stay)
            if last[r] == i and r not in keep:
                live -= sizes.pop(r, 0)
    return SliceCost(
        tuple(costs), int(peak), sum(m.nbytes for m in weights.values()), float(sum(c.flops for c in costs))
    )


def check_slice_budget(spec: SliceSpec, order: tuple[OpNode, ...], cost: SliceCost, limits: OpLimits) -> None:
    """Raise :class:`OpOverBudget` naming the first op over the scratch or time budget (or the peak)."""
    max_flops = limits.max_flops
    for op, c in zip(order, cost.ops):
        if c.workspace_bytes > limits.max_workspace_bytes:
            raise OpOverBudget(
                f"op {op.name!r} ({op.target}) would need about {c.workspace_bytes / 2**20:.0f} MiB of kernel "
                f"scratch; the per-op limit is {limits.max_workspace_bytes / 2**20:.0f} MiB"
            )
        if c.flops > max_flops:
            raise OpOverBudget(
                f"op {op.name!r} ({op.target}) would take about {c.flops / limits.device_flops * 1e3:.0f} ms "
                f"({c.flops / 1e9:.1f} GFLOP); the per-op time budget is {limits.max_op_ms:.0f} ms"
            )
    if limits.max_peak_bytes and cost.peak_bytes > limits.max_peak_bytes:
        raise OpOverBudget(
            f"the slice would hold about {cost.peak_bytes / 2**20:.0f} MiB at once while running; "
            f"the limit is {limits.max_peak_bytes / 2**20:.0f} MiB"
        )
