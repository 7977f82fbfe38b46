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
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from edge_server.errors import ResourceExhausted
from modelgraph import SliceSpec, TensorMeta
from modelgraph.argcodec import TensorRef, WeightRef, bind
from modelgraph.graph import OpNode
from modelgraph.tensors import contiguous_strides, dense_layout, restorable_layout

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
    "matrix_product_flops",
    "measure_slow_gemm_rates",
    "priced_seconds",
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
    slow_gemm_rates: tuple[tuple[str, float, float], ...] = ()
    """(dtype, matmul FLOP/s, convolution FLOP/s) of the dtypes whose matrix products or convolutions take a slow,
    non-vectorised path on this device (:func:`measure_slow_gemm_rates`): a GEMM-family op in one of them is timed
    at that rate, not at ``device_flops``."""
    threads: int = 1
    """Intra-op threads ``device_flops`` was multiplied by (:func:`measure_device_flops`): an op's serial work
    (``OpCost.serial_flops``) is timed at one thread's rate, ``device_flops / threads``."""

    @property
    def slow_gemm_dtypes(self) -> tuple[str, ...]:
        return tuple(r[0] for r in self.slow_gemm_rates)

    @property
    def max_flops(self) -> float:
        return self.max_op_ms / 1e3 * self.device_flops


@dataclass(frozen=True, slots=True)
class OpCost:
    flops: float
    """Floating-point operations (multiply-add = 2), scaled for slow dtypes (float64 x2, complex x4)."""
    workspace_bytes: int
    """Scratch the kernel may allocate beyond the op's inputs and declared outputs (upper bound)."""
    serial_flops: float = 0.0
    """The part of ``flops`` that is per-matrix and thin-matrix work of a matrix product (:func:`matrix_product_flops`)
    or per-head work of attention: timed at one intra-op thread's rate whatever the server's thread count, and not
    at a slow dtype's GEMM rate (its constants were measured per dtype family)."""


@dataclass(frozen=True, slots=True)
class SliceCost:
    ops: tuple[OpCost, ...]
    """Per op, in execution order."""
    peak_bytes: int
    """Largest sum of live cut tensors + intermediates (with the storage their views keep alive) + one op's output
    and scratch (weights excluded)."""
    weight_bytes: int
    total_flops: float


def measure_device_flops(device: torch.device, *, n: int = 256, repeats: int = 8) -> float:
    """float32 matmul FLOP/s of ``device`` (n x n x n products, best of ``repeats``; floor 1 GFLOP/s).

    CPU: one intra-op thread's rate read from that thread's own CPU time (``time.thread_time``: time the OS gave
    to other processes does not count), times ``torch.get_num_threads()`` (the server's intra-op threads, set
    before this is called): the rate of the cores the server may use, whatever else runs at start. Up to session
    14 it was the wall clock of the multi-threaded product, best of 3: three starts on the 2-core project machine
    read 3.6, 85 and 120 GFLOP/s (a loaded start set a per-op budget 20-30x too tight, which would refuse
    ordinary LSTMs), and with 8 busy processes beside it 1.0 (two OpenMP threads wait at each barrier for a
    descheduled partner); this reads 88-99 there and 97-100 idle (x 2 threads). Sets the torch thread count to 1
    for the few milliseconds it runs (process-wide), then back.
    CUDA: the wall clock with ``torch.cuda.synchronize``, best of ``repeats``.
    """
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    best = math.inf
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                torch.mm(a, b)
                for _ in range(repeats):
                    t0 = time.thread_time()
                    torch.mm(a, b)
                    best = min(best, time.thread_time() - t0)
        finally:
            torch.set_num_threads(threads)
        return max(2.0 * n**3 / max(best, 1e-9) * threads, 1e9)
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return max(2.0 * n**3 / max(best, 1e-9), 1e9)


SLOW_MM_FALLOFF = 32.0
"""How much slower per FLOP a slow dtype's large matmul-family op (and RNN, attention) runs than the small one
:func:`measure_slow_gemm_rates` times (session 16, attack16). torch 2.13's CPU float16 matmul and convolution have
no vectorised kernel on a CPU without AVX512-FP16 / AMX-FP16 (this project's machine: oneDNN reports no fp16
support), and the op budget counted their FLOPs at float32's rate: one thread did float16 ``mm`` at 5.8 / 2.3 /
0.8 / 0.26 GFLOP/s for n = 128 / 512 / 1024 / 2048 (22x from the timed size to the slowest measured; two threads
were no faster) and ``conv2d`` at 1.6 / 0.9 / 0.56 GFLOP/s (16 ch 32 px, 64 ch 64-128 px, 64 ch 256 px), against
83-95 (mm) and 135-185 (conv) for float32: a 0.7 KB slice of a float16 1024 x 1024 ``mm`` held the compute
worker 3.8 s (counted 25 ms; ~10 minutes at the budget's edge) (``docs/results/attack/session16/``)."""
SLOW_CONV_FALLOFF = 4.0
"""As ``SLOW_MM_FALLOFF`` for convolutions (1.6 -> 0.56 GFLOP/s measured: 2.9x)."""
SLOW_GEMM_RATIO = 4.0
"""A dtype is slow when its small matmul or convolution runs at under 1/this of float32's rate; a vectorised path
runs at 0.5-4x float32's (bfloat16 here: 1.0x at n = 128, 4.6x at 1024; float16: 15x / 25x slower)."""
_GEMM_OPS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "convolution", "mm",
                       "bmm", "addmm", "baddbmm", "matmul", "linear", "scaled_dot_product_attention", "lstm", "gru",
                       "rnn_tanh", "rnn_relu"})


def measure_slow_gemm_rates(device: torch.device, *, repeats: int = 3) -> tuple[tuple[str, float, float], ...]:
    """(dtype, matmul FLOP/s, convolution FLOP/s) of the half-precision dtypes (``float16``, ``bfloat16``) whose
    matmul or convolution is slow on ``device``.

    CPU only (a CUDA device runs them natively: ``()``): one intra-op thread times, by its own CPU time (best of
    ``repeats``), a 128 x 128 ``mm`` and a 16-channel 32 x 32 ``conv2d`` in float32 and in each dtype; a dtype
    whose mm or conv runs at under ``1 / SLOW_GEMM_RATIO`` of float32's rate is slow, and its rates are the
    measured ones / ``SLOW_MM_FALLOFF`` and ``SLOW_CONV_FALLOFF`` (the slow kernels' rate falls with size: above).
    Not multiplied by the thread count: the slow path ran no faster on two threads. A few milliseconds (float16
    here: ~3 ms for the mm, ~3 ms for the conv, each run ``repeats + 1`` times). Sets the torch thread count to 1
    for that time (process-wide), then back, as :func:`measure_device_flops` does. Returns ``()`` if none is slow.
    """
    if device.type != "cpu":
        return ()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mm_flops, conv_flops = 2.0 * 128**3, 2.0 * 16 * 16 * 9 * 32 * 32

    def best(fn) -> float:
        fn()
        t = math.inf
        for _ in range(repeats):
            t0 = time.thread_time()
            fn()
            t = min(t, time.thread_time() - t0)
        return max(t, 1e-9)

    def rates(dtype: torch.dtype) -> tuple[float, float]:
        a, b = torch.rand(128, 128).to(dtype), torch.rand(128, 128).to(dtype)
        x, w = torch.rand(1, 16, 32, 32).to(dtype), torch.rand(16, 16, 3, 3).to(dtype)
        return (mm_flops / best(lambda: torch.mm(a, b)),
                conv_flops / best(lambda: torch.nn.functional.conv2d(x, w, padding=1)))

    slow: list[tuple[str, float, float]] = []
    try:
        with torch.inference_mode():
            mm32, conv32 = rates(torch.float32)
            for name in ("float16", "bfloat16"):
                try:
                    mm, conv = rates(getattr(torch, name))
                except RuntimeError:  # no kernel at all: the op fails at run time, nothing to bound
                    continue
                if mm * SLOW_GEMM_RATIO < mm32 or conv * SLOW_GEMM_RATIO < conv32:
                    slow.append((name, min(mm, mm32) / SLOW_MM_FALLOFF, min(conv, conv32) / SLOW_CONV_FALLOFF))
    finally:
        torch.set_num_threads(threads)
    return tuple(slow)


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

_MAY_ALIAS_OPS = frozenset({"reshape", "flatten", "contiguous", "to", "type_as", "dropout", "feature_dropout"})
"""Ops whose output is their first argument's storage or a new tensor, by that argument's layout or the op's mode
(``reshape`` / ``flatten`` view when the strides allow, ``contiguous`` / ``to`` / ``type_as`` return their argument
when it already fits, ``dropout`` in eval returns its input): counted both ways (their output's bytes, and their
argument's storage kept alive while the output lives). Found by running each allowlisted op whose output might share
storage (torch 2.13, CPU); the ops in ``_VIEWS`` always do."""

_STRIDED_OK = frozenset({
    # views and may-alias ops (a copy a may-alias op makes is its output, counted as such)
    *_VIEWS, *_MAY_ALIAS_OPS, "_to_copy",
    "lift_fresh_copy", "clone", "copy", "slice_scatter", "select_scatter",
    # the matrix products: their own rule charges each operand ATen copies (stride-0 and gapped ones included:
    # ``matmul_copy_bytes``), or both operands' logical bytes where the strides are not pinned
    "mm", "bmm", "addmm", "baddbmm", "matmul",
    # TensorIterator elementwise ops and reductions: read strides in place
    "abs", "add", "sub", "rsub", "mul", "div", "neg", "pow", "reciprocal", "rsqrt", "sqrt", "exp", "log", "erf",
    "relu", "relu6", "gelu", "silu", "mish", "elu", "leaky_relu", "hardsigmoid", "hardswish", "hardtanh", "sigmoid",
    "tanh", "softplus", "clamp", "clamp_max", "clamp_min", "maximum", "minimum", "eq", "ne", "gt", "ge", "lt", "le",
    "logical_and", "logical_not", "logical_or", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not",
    "__and__", "__or__", "__xor__", "where", "masked_fill", "prelu", "_prelu_kernel", "fill", "zero",
    "native_dropout", "full_like", "ones_like", "zeros_like", "new_full", "new_ones", "new_zeros",
    "sum", "mean", "amax", "amin", "argmax", "max", "var", "std", "cumsum",
    # gathers and scatters, copies into a fresh output, factories
    "index", "index_select", "gather", "index_put", "scatter", "scatter_add", "embedding", "embedding_bag",
    "_embedding_bag", "cat", "stack", "flip", "roll", "repeat", "tile", "constant_pad_nd", "tril", "triu",
    "full", "ones", "zeros", "arange", "scalar_tensor",
    # strided kernels, and kernels whose own rule counts a copy of their input (sort / argsort / topk)
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "rms_norm", "batch_norm", "native_batch_norm",
    "_native_batch_norm_legit_no_training", "grid_sampler", "grid_sampler_2d", "upsample_nearest2d",
    "upsample_bilinear2d", "upsample_bicubic2d", "sort", "argsort", "topk",
})
"""Ops that read a stride-0 or gapped argument where it lies, with no dense copy beyond their declared outputs
(break33: every allowlisted op run on a 32 MiB ``expand`` of one element against a dense input of the same shape,
peak RSS compared, torch 2.13 CPU: ``bench/probe_strided_copies.py``, ``docs/results/kernels/strided_copies.txt``).
Every other op, unknown ones included, is costed a dense copy of each such argument (``estimate_slice``): measured
copying were ``linear``, ``scaled_dot_product_attention`` (q, k, v), every pool but the adaptive average ones,
``adaptive_max_pool2d``, ``group_norm`` / ``layer_norm`` / ``instance_norm``, ``lstm``, ``softmax`` /
``log_softmax``, ``pixel_shuffle`` / ``pixel_unshuffle`` / ``channel_shuffle``, ``_weight_norm``, the convolutions,
``pad`` in reflect / replicate mode. ``gru`` / ``rnn_*`` measured no copy but are counted too."""


_CONTIGUOUS_OUT = frozenset({"mm", "bmm", "addmm", "baddbmm", "matmul", "linear"})
"""Ops whose CPU kernel returns a fresh contiguous tensor whatever its inputs' layouts (``_matmul_impl`` ends in an
``_unsafe_view`` of a ``bmm`` / ``mm`` output; ``linear`` in ``addmm`` or ``matmul``)."""
_LAYOUT_FROM_INPUTS = frozenset({
    *_VIEWS, *_MAY_ALIAS_OPS, "_to_copy", "clone",
    "abs", "add", "sub", "rsub", "mul", "div", "neg", "pow", "reciprocal", "rsqrt", "sqrt", "exp", "log", "erf",
    "relu", "gelu", "silu", "sigmoid", "tanh", "clamp", "clamp_max", "clamp_min", "maximum", "minimum",
    "eq", "ne", "gt", "ge", "lt", "le", "where", "masked_fill",
    "softmax", "_softmax", "log_softmax", "_log_softmax", "layer_norm", "native_layer_norm",
})
"""Ops whose CPU kernel lays its output out as its meta kernel does, given the same input layouts (views and
reshapes: one C++ stride rule for both; TensorIterator ops and the structured softmax / layer norm kernels: one
meta function): their output's meta strides are its run-time strides when every tensor input's are
(``tests/test_matmul_copies.py`` runs each on contiguous, permuted, broadcast and gapped inputs). Any other op's
output (``scaled_dot_product_attention``'s meta strides differ from its kernel's) has unknown strides, and a matrix
product reading it is costed by the conservative rule."""

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


# ---- matrix products: per-matrix and thin-matrix work (break42 F1) --------------------------------------------
# A product's FLOPs at the large-GEMM rate (``measure_device_flops``: 256^3) price a batch of millions of thin
# matrices 20-400x below what it runs: each matrix is a kernel call with a fixed cost, and a product with a small
# m, n or k wastes the vector lanes (m = n = 1 is a serial dot product), writes its outputs one at a time (small k)
# or waits on memory for its operands (break42 F1: 3M 1 x 64 x 1 products of two broadcast views priced 2.3 ms ran
# 65 ms; 65k 1 x 4096 x 1 priced 3 ms ran 0.6 s, each holding the only compute worker). The terms below are
# matmul-equivalent FLOPs: the time one unit took on this project's 2-core machine (torch 2.13, MKL, float32, one
# intra-op thread, operands out of cache: batches of 80+ MB) x that thread's matmul rate (161 GFLOP/s), rounded up
# so every case of the sweep is priced at or above its time, 1.25x at the closest
# (``docs/results/attack/session34/bmm_cost_sweep.py`` and ``.txt``: 894 cases, m, n in 1..197, k in 1..4096,
# broadcast, dense and transposed operands, bmm / baddbmm / matmul / mm, float64 / bfloat16 / float16, attention;
# the zoo's products 1.2-3.2x). :func:`matrix_product_flops` adds them up.
MM_MATRIX_FLOPS = 16_000.0
"""Per matrix (per kernel call: each of a batch, 1 for ``mm``): ~100 ns (20-90 ns measured for the smallest BLAS
products, 4-5 ns per 1 x 1 x 1 in ATen's own small kernel)."""
MM_SMALL_K = 32
"""Below this inner dimension a product's outputs are written one by one (MKL's small-k path): see
``MM_OUT_SMALL_K_FLOPS``."""
MM_OUT_SMALL_K_FLOPS = 560.0
"""Per output element of a product with k < ``MM_SMALL_K``: 3.5 ns (1.5-1.8 ns for k = 1-16 at m, n >= 16, up to
3.2 at 3 x 1 x 197; output-bound)."""
MM_OUT_FLOPS = 320.0
"""Per output element from k = ``MM_SMALL_K`` on: 2 ns (a fresh output's pages are faulted in and written: 512 x 64 x
512 products ran 388 us into a reused output, 676 us into a fresh one, 208 us at the GEMM rate)."""
MM_THIN_FLOPS = 480.0
"""Per multiply-add of a product too thin to fill the vector lanes, divided by min(m, ``MM_THIN_ROWS``) x
min(n, ``MM_THIN_COLS``): 3 ns per MAC at m = n = 1 (a serial dot product: 2.3-2.9 ns measured for k = 512-4096),
0.26-0.29 ns at n = 1 and m >= 8, 0.03 at n = 8, the large-GEMM rate (0.0124 ns, 2 FLOPs) from n = 32."""
MM_THIN_ROWS = 8
MM_THIN_COLS = 32
MM_OPERAND_FLOPS = 160.0
"""Per element of either operand of each matrix (as many as its batch reads, broadcast or not): 1 ns, the operands'
memory traffic (0.3-0.9 ns per element measured for dense thin products, transposed ones the dearest; a broadcast
operand stays in cache and costs less)."""
BMM_SMALL_MACS = 400
"""ATen's own (non-BLAS) CPU kernel for ``bmm`` / ``baddbmm`` of matrices of fewer multiply-adds than this
(``bmm_out_or_baddbmm_``: ``contraction_size * res_rows * res_cols < 400``), costed by the two terms below."""
BMM_SMALL_MATRIX_FLOPS = 1600.0
"""Per matrix in ATen's small kernel: 10 ns (4-6 ns per 1 x 1 x 1 to 1 x 8 x 1 measured)."""
BMM_SMALL_OUT_FLOPS = 960.0
"""Per output element in ATen's small kernel: 6 ns (2.6-5.5 measured, 4.5 at 16 x 1 x 16)."""
BMM_SMALL_MAC_FLOPS = 200.0
"""Per multiply-add in ATen's small kernel: 1.25 ns (0.3-1.0 measured, 1 x 64 x 3 of dense operands the dearest)."""
MM_HALF_MATRIX_FLOPS = 64_000.0
"""Per bfloat16 / float16 matrix on top of the float32 terms: 400 ns (oneDNN's per-call set-up: 100 ns per 1 x 8 x 1
bfloat16 matrix against 5 in float32, 270-350 ns per 1 x 64 x 1 against 20)."""
MM_HALF_FACTOR = 3.0
"""bfloat16 / float16 products' per-matrix and thin work against float32's (a slow dtype's multiply-adds are timed at
its own rate besides)."""


def matrix_product_flops(batch: int, m: int, k: int, n: int, *, small_kernel: bool = True,
                         half: bool = False) -> tuple[float, float]:
    """Matmul-equivalent FLOPs of ``batch`` products of an ``m x k`` by a ``k x n`` matrix, as
    (GEMM FLOPs, serial FLOPs).

    GEMM FLOPs: ``2 * batch * m * k * n`` (a multiply-add is 2), timed at the device's GEMM rate. Serial FLOPs: the
    work that rate does not see, timed at one intra-op thread's rate (``OpCost.serial_flops``): per matrix
    ``MM_MATRIX_FLOPS``, per output element ``MM_OUT_SMALL_K_FLOPS`` (k < ``MM_SMALL_K``) or ``MM_OUT_FLOPS``, per
    multiply-add what the thin-matrix rate (``MM_THIN_FLOPS`` / (min(m, 8) x min(n, 32))) adds to the GEMM rate's 2,
    per operand element ``MM_OPERAND_FLOPS``; with ``small_kernel`` (a CPU ``bmm`` / ``baddbmm`` / batched
    ``matmul``), matrices of under ``BMM_SMALL_MACS`` multiply-adds are costed as ATen's small kernel runs them
    instead (``BMM_SMALL_MATRIX_FLOPS`` per matrix, ``BMM_SMALL_OUT_FLOPS`` per output, ``BMM_SMALL_MAC_FLOPS`` per
    multiply-add). ``half``: bfloat16 / float16, whose serial work is ``MM_HALF_FACTOR`` times float32's and
    ``MM_HALF_MATRIX_FLOPS`` more per matrix. The dtype's own factor (float64 x2, complex x4) is the caller's. Sizes
    are element counts (>= 0); a product with no output costs (0, 0). No errors.
    """
    if batch <= 0 or m <= 0 or n <= 0:
        return 0.0, 0.0
    macs = m * k * n
    gemm = 2.0 * batch * macs
    if small_kernel and macs < BMM_SMALL_MACS:
        per = BMM_SMALL_MATRIX_FLOPS + m * n * (BMM_SMALL_OUT_FLOPS + BMM_SMALL_MAC_FLOPS * k) - 2.0 * macs
    else:
        lanes = min(m, MM_THIN_ROWS) * min(n, MM_THIN_COLS)
        per = (MM_MATRIX_FLOPS + m * n * (MM_OUT_SMALL_K_FLOPS if k < MM_SMALL_K else MM_OUT_FLOPS)
               + macs * max(0.0, MM_THIN_FLOPS / lanes - 2.0) + MM_OPERAND_FLOPS * (m * k + k * n))
    return gemm, batch * (per * MM_HALF_FACTOR + MM_HALF_MATRIX_FLOPS if half else per)


def _matmul(name: str, args: list, out: TensorMeta, device: torch.device) -> OpCost:
    cpu = device.type == "cpu"
    if name == "linear":
        x, w = args[0], args[1]
        if not isinstance(x, TensorMeta) or not isinstance(w, TensorMeta) or not x.shape:
            return OpCost(0.0, 0)
        k = x.shape[-1]
        n = w.shape[0] if len(w.shape) == 2 else 1
        rows = _numel(x) // max(k, 1)
        gemm, serial = matrix_product_flops(1, rows, k, n, small_kernel=False, half=x.dtype in HALF_MM_DTYPES)
        f = _dtype_factor(x)
        return OpCost((gemm + serial) * f, 0, serial * f)
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
    # without the operands' strides (``estimate_slice`` replaces this by ``matmul_copy_bytes`` where it knows
    # them): a broadcast or non-contiguous operand may be copied whole before the GEMM, both counted
    ws = (batch * m * k + batch * k * n) * item
    if a.dtype in HALF_MM_DTYPES:  # float32 working buffers (measured, see HALF_MM_DTYPES)
        ws += batch * (m * k + k * n + m * n) * HALF_MM_SCRATCH
    # a batched matmul (a batch dim on either side) is priced as the bmm it may become: a >= 3-D by <= 2-D one that
    # ATen folds into one mm costs less, never more
    small = cpu and (name in ("bmm", "baddbmm") or (name == "matmul" and len(batch_shape) > 0))
    gemm, serial = matrix_product_flops(batch, m, k, n, small_kernel=small, half=a.dtype in HALF_MM_DTYPES)
    f = _dtype_factor(a)
    return OpCost((gemm + serial) * f, int(ws), serial * f)


HALF_MM_DTYPES = frozenset({"float16", "bfloat16"})
"""dtypes whose CPU matrix products allocate float32 working buffers on top of any operand copy (torch 2.13, this
project's machine, ``bench/probe_matmul_copies.py``): a float16 ``mm`` of a gapped [64, 48] by a [48, 40] took up
to 45,952 bytes of scratch (both operands' logical bytes are 9,984; a, b and c are 7,552 elements), a bfloat16 one
22,272; a float16 ``bmm`` of 6 such matrices 95,872 (59,904). Costed as both operands' logical bytes plus
``HALF_MM_SCRATCH`` bytes per element of a, b and the output over the whole batch."""
HALF_MM_SCRATCH = 8
"""Bytes per element of a, b and c a half-precision CPU matrix product is costed beyond its operands (two float32
buffers' worth: 45,952 measured against 9,984 + 4 x 7,552 = 40,192 for one)."""


# ---- matrix products: the operand copies ATen's CPU kernels make, per operand ----------------------------------
_MM_FAMILY = frozenset({"mm", "bmm", "addmm", "baddbmm", "matmul"})
EXACT_MM_DTYPES = frozenset({"float32", "float64"})
"""dtypes whose CPU matrix products :func:`matmul_copy_bytes` costs exactly: they run ATen's own BLAS paths
(``addmm_impl_cpu_``, ``bmm_out_or_baddbmm_``'s MKL batched gemm or its per-matrix split). Others (half precision:
oneDNN's ``mkldnn_matmul`` copies a whole non-"optimized" batch; complex: ``resolve_conj``; integers) keep the
conservative rule (both operands' logical bytes)."""
GEMM_BATCH_POINTER_BYTES = 24
"""Per matrix of a batched product: ``cpublas::gemm_batched_with_stride`` builds three pointer arrays (a, b, c) of
``batch`` pointers each with ``malloc`` (``c10::SmallBuffer``), outside torch's allocator."""


def _blas_ready(rows: int, cols: int, s0: int, s1: int) -> bool:
    """A [rows, cols] matrix of strides (s0, s1) goes to BLAS as it lies: row-major with a leading dimension of at
    least its columns, or column-major with one of at least its rows (``addmm_impl_cpu_``'s test, torch 2.13,
    ``aten/src/ATen/native/LinearAlgebra.cpp``); any other layout (a stride 0, a gap between elements of a row, an
    overlap) is first cloned contiguous: rows x cols elements."""
    return (s1 == 1 and s0 >= max(1, cols)) or (s0 == 1 and s1 >= max(1, rows))


def _mv_ready(rows: int, cols: int, s0: int, s1: int) -> bool:
    """``addmv_out_cpu``'s test (``Blas.cpp``): gemv takes the matrix as it lies, else ``mat.contiguous()``."""
    return (s0 == 1 and (cols == 1 or s1 >= max(1, rows))) or (s1 == 1 and (rows == 1 or s0 >= max(1, cols)))


def _view_strides(shape: tuple[int, ...], stride: tuple[int, ...], new: tuple[int, ...]) -> tuple[int, ...] | None:
    """The strides ``view(new)`` gives a tensor of ``shape``/``stride``, or None where no view exists and
    ``reshape`` copies (ATen's ``computeStride``, ``aten/src/ATen/TensorUtils.cpp``, ported line for line)."""
    if not shape:
        return (1,) * len(new)
    numel = math.prod(shape)
    if numel == 0:
        if tuple(shape) == tuple(new):
            return tuple(stride)
        out = [0] * len(new)
        for d in range(len(new) - 1, -1, -1):
            out[d] = 1 if d == len(new) - 1 else max(new[d + 1], 1) * out[d + 1]
        return tuple(out)
    out = [0] * len(new)
    view_d = len(new) - 1
    chunk_base = stride[-1]
    tensor_numel = view_numel = 1
    for tensor_d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[tensor_d]
        if tensor_d == 0 or (shape[tensor_d - 1] != 1 and stride[tensor_d - 1] != tensor_numel * chunk_base):
            while view_d >= 0 and (view_numel < tensor_numel or new[view_d] == 1):
                out[view_d] = view_numel * chunk_base
                view_numel *= new[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if tensor_d > 0:
                chunk_base = stride[tensor_d - 1]
                tensor_numel = view_numel = 1
    return None if view_d != -1 else tuple(out)


def _expand_strides(shape: tuple[int, ...], stride: tuple[int, ...], to: tuple[int, ...]) -> tuple[int, ...]:
    """``expand(to)``'s strides (ATen's ``inferExpandGeometry``): a dim that grows from size 1 (or a new leading
    dim of size > 1) reads stride 0; a new leading dim of size 1 gets the next dim's size x stride."""
    out = [0] * len(to)
    lead = len(to) - len(shape)
    for i in range(len(to) - 1, -1, -1):
        d = i - lead
        size = shape[d] if d >= 0 else 1
        st = stride[d] if d >= 0 else (to[i + 1] * out[i + 1] if i + 1 < len(to) else 1)
        out[i] = 0 if size != to[i] else st
    return tuple(out)


def _to_3d(shape: tuple[int, ...], stride: tuple[int, ...], batch: tuple[int, ...], mat: tuple[int, int],
           item: int) -> tuple[tuple[int, int, int], int]:
    """``t.expand(batch + mat).reshape(prod(batch), *mat)`` as ``_matmul_impl`` does it: the 3-D strides the bmm
    sees and the bytes the reshape copies (0 for a view; the whole expanded tensor, contiguous, otherwise)."""
    full = (*batch, *mat)
    b = math.prod(batch)
    new = (b, *mat)
    st = _view_strides(full, _expand_strides(shape, stride, full), new)
    if st is not None:
        return st, 0
    return (mat[0] * mat[1], mat[1], 1), b * mat[0] * mat[1] * item


def _bmm_copies(b: int, m: int, k: int, n: int, sa: tuple[int, ...], sb: tuple[int, ...], item: int) -> int:
    """Scratch of a CPU ``bmm`` / ``baddbmm`` of [b, m, k] x [b, k, n] (``bmm_out_or_baddbmm_``): with every
    matrix BLAS-ready (either operand's batch stride, 0 included, is read as it lies) MKL's batched gemm, which
    ``malloc``s three pointer arrays; otherwise a ``addmm_impl_cpu_`` per matrix, which clones the one matrix of an
    operand that is not ready (freed before the next: one matrix at a time)."""
    ws = GEMM_BATCH_POINTER_BYTES * b if b > 1 else 0
    if not _blas_ready(m, k, sa[1], sa[2]):
        ws += m * k * item
    if not _blas_ready(k, n, sb[1], sb[2]):
        ws += k * n * item
    return ws


def matmul_copy_bytes(name: str, a_shape: tuple[int, ...], a_stride: tuple[int, ...], b_shape: tuple[int, ...],
                      b_stride: tuple[int, ...], item: int) -> int:
    """Bytes a CPU ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` / ``matmul`` of operands ``a`` and ``b`` (their shapes
    and run-time strides, in elements; ``item``: bytes per element) allocates beyond its output: the copies ATen
    makes of the operands that its kernels cannot read where they lie (float32 / float64, ``EXACT_MM_DTYPES``).

    Source: torch 2.13's ``aten/src/ATen/native/LinearAlgebra.cpp`` and ``Blas.cpp`` (no autograd: the server runs
    under ``inference_mode``, nothing requires grad):

    - ``mm`` / ``addmm`` (``addmm_impl_cpu_``): an operand not BLAS-ready (:func:`_blas_ready`) is cloned
      contiguous (its logical bytes; a stride-0 ``expand`` is allocated whole); the bias is copied into the output.
    - ``bmm`` / ``baddbmm``: :func:`_bmm_copies` (per matrix, never the whole batch).
    - ``matmul`` (``_matmul_impl``): 1-D x 1-D is ``dot`` (strided BLAS, nothing); 2-D x 1-D is ``mv``
      (:func:`_mv_ready`, and the vector is charged whole unless its stride is 1); 1-D x 2-D and 2-D x 2-D are
      ``mm`` (the vector as a [1, k] row); a >= 3-D operand against a <= 2-D one is folded into a matrix by a view
      when ``should_fold``'s stride test holds (then ``mm`` / ``mv`` on the view); otherwise both operands are
      broadcast (``expand``, stride 0) to the common batch shape and reshaped to 3-D: a reshape that cannot be a
      view (:func:`_view_strides`: batch dims that do not merge, e.g. a permuted head dim, or a stride-0 batch dim
      beside a strided one) copies the whole expanded operand (``batch x rows x cols`` elements), then ``bmm``.

    Checked against the allocations torch's CPU allocator reports (``bench/probe_matmul_copies.py``,
    ``docs/results/kernels/matmul_copies.txt``): never below the measured scratch.
    """
    if name in ("mm", "addmm"):
        if len(a_shape) != 2 or len(b_shape) != 2:
            return 0
        (m, k), n = a_shape, b_shape[1]
        return (0 if _blas_ready(m, k, *a_stride) else m * k * item) + \
            (0 if _blas_ready(k, n, *b_stride) else k * n * item)
    if name in ("bmm", "baddbmm"):
        if len(a_shape) != 3 or len(b_shape) != 3:
            return 0
        return _bmm_copies(a_shape[0], a_shape[1], a_shape[2], b_shape[2], a_stride, b_stride, item)
    d1, d2 = len(a_shape), len(b_shape)
    if d1 == 0 or d2 == 0:
        return 0
    if d1 == 1 and d2 == 1:
        return 0
    if d1 == 2 and d2 == 1:
        return (0 if _mv_ready(*a_shape, *a_stride) else math.prod(a_shape) * item) + \
            (0 if b_stride[0] == 1 else b_shape[0] * item)
    if d1 == 1 and d2 == 2:
        k = a_shape[0]
        return matmul_copy_bytes("mm", (1, k), (k * a_stride[0], a_stride[0]), b_shape, b_stride, item)
    if d1 == 2 and d2 == 2:
        return matmul_copy_bytes("mm", a_shape, a_stride, b_shape, b_stride, item)
    if (d1 >= 3 and d2 <= 2) or (d2 >= 3 and d1 == 1):  # should_fold's cases (d1 == 2 never folds)
        if d1 >= d2:
            big, bst, small, sst = a_shape, a_stride, b_shape, b_stride
        else:  # t1 = tensor2.mT(), t2 = tensor1 (a vector)
            big = (*b_shape[:-2], b_shape[-1], b_shape[-2])
            bst = (*b_stride[:-2], b_stride[-1], b_stride[-2])
            small, sst = a_shape, a_stride
        if math.prod(big) == 0 or all(bst[i] == bst[i + 1] * big[i + 1] for i in range(len(big) - 2)):
            rows = math.prod(big[:-1])
            if len(small) == 2:
                return matmul_copy_bytes("mm", (rows, big[-1]), (bst[-2], bst[-1]), small, sst, item)
            return matmul_copy_bytes("matmul", (rows, big[-1]), (bst[-2], bst[-1]), small, sst, item)
    # batched: broadcast the batch dims, reshape each operand to 3-D (a copy where no view exists), then bmm
    n_ = a_shape[-2] if d1 > 1 else 1
    k = a_shape[-1]
    p = b_shape[-1] if d2 > 1 else 1
    try:
        batch = tuple(torch.broadcast_shapes(a_shape[:-2] if d1 > 1 else (), b_shape[:-2] if d2 > 1 else ()))
    except RuntimeError:
        return 0  # the op fails (validation already ran its meta kernel)
    a3, ca = _to_3d(a_shape, a_stride, batch, (n_, k), item)
    if d2 == 1:  # expand(batch + [k]).reshape(b, k).unsqueeze(2)
        full = (*batch, k)
        bsz = math.prod(batch)
        st = _view_strides(full, _expand_strides(b_shape, b_stride, full), (bsz, k))
        b3, cb = ((st[0], st[1], 1), 0) if st is not None else ((k, 1, 1), bsz * k * item)
    else:
        b3, cb = _to_3d(b_shape, b_stride, batch, (k, p), item)
    return ca + cb + _bmm_copies(math.prod(batch), n_, k, p, a3, b3, item)


def _sdpa(args: list, kwargs: Mapping, out: TensorMeta, *, flash: bool = False) -> OpCost:
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, ...)``: the products' FLOPs at the GEMM rate,
    and serial work per head, per query row and per score (``SDPA_*``). ``flash``: the caller proved the CPU flash
    kernel runs it (:func:`_sdpa_flash_ready`); otherwise the math path's (bmm, softmax, bmm: scores materialised)
    costs, which bound the flash kernel's too."""
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
    # break42 F1's analogue (session 34): 1M heads of 1 x 1 x 1 ran 164 ms, priced 0.06 ms as FLOPs
    half = q.dtype in HALF_MM_DTYPES
    serial = batch * SDPA_HEAD_FLOPS + batch * seq_q * SDPA_ROW_FLOPS
    if flash:  # its products read q, k, v and write the output as a product's operands and output do
        serial += SDPA_FLASH_SCORE_FLOPS * scores + batch * (
            MM_OPERAND_FLOPS * (seq_q * e + seq_k * e + seq_k * ev) + MM_OUT_FLOPS * seq_q * ev)
    else:
        serial += SDPA_MATH_SCORE_FLOPS * scores
        for rows, inner, cols in ((seq_q, e, seq_k), (seq_q, seq_k, ev)):
            serial += matrix_product_flops(batch, rows, inner, cols)[1]
    dropout = _arg(args, kwargs, 4, "dropout_p", 0.0)
    if not isinstance(dropout, int | float) or dropout:
        serial += SDPA_DROPOUT_SCORE_FLOPS * scores
    if isinstance(_arg(args, kwargs, 3, "attn_mask", None), TensorMeta):
        serial += batch * SDPA_MASK_HEAD_FLOPS + SDPA_MASK_SCORE_FLOPS * scores
    f = _dtype_factor(q)
    serial *= f * (MM_HALF_FACTOR if half else 1.0)
    return OpCost(flops * f + serial, int(ws), serial)


def _sdpa_flash_ready(q: TensorMeta, k: TensorMeta, v: TensorMeta, strides: tuple, dropout) -> bool:
    """Whether torch 2.13's CPU ``scaled_dot_product_attention`` takes its flash kernel (``sdp_utils_cpp``'s
    checks, those the budget can see): q, k and v 4-D with equal batch and head counts (broadcast ones take the math
    path) and non-empty sequences, one head dim, no dropout, each last dim of stride 1 (its
    trusted run-time ``strides``, in q, k, v order; None where not trusted). Otherwise the math path (measured
    4x the flash kernel's time per score: 3-D inputs, a transposed last dim, dropout, unequal head dims)."""
    if not all(len(t.shape) == 4 for t in (q, k, v)) or not q.shape[-1] == k.shape[-1] == v.shape[-1]:
        return False
    if not q.shape[:2] == k.shape[:2] == v.shape[:2] or not q.shape[2] or not k.shape[2]:
        return False  # broadcast batch / heads run the math path (review34: priced 64 ms as flash, ran 155)
    if not isinstance(dropout, int | float) or dropout:
        return False
    return all(st is not None and (st[-1] == 1 or t.shape[-1] == 1) for t, st in zip((q, k, v), strides))


SDPA_HEAD_FLOPS = 64_000.0
"""Per (batch x head) of ``scaled_dot_product_attention``: 400 ns, the kernel's set-up (flash kernel, session 34: 164 ns
per head of 1 x 1 x 1 with 4-D inputs)."""
SDPA_ROW_FLOPS = 16_000.0
"""Per query row of each head: 100 ns (the flash kernel's per-block softmax bookkeeping: 1.1 us per 8 x 8 x 8 head)."""
SDPA_FLASH_SCORE_FLOPS = 320.0
"""Per score (query x key of each head) in the flash kernel, beyond the products' FLOPs: 2 ns (2.2-3.4 ns per score
in all measured at L = S = 197-2048, E = 64, products included)."""
SDPA_MATH_SCORE_FLOPS = 1920.0
"""Per score in the math path, beyond its two products' own terms: 12 ns (9.1-10.7 ns per score in all measured at
L = S = 512-2048: the scores, the scaled copy and the softmax are written out)."""
SDPA_DROPOUT_SCORE_FLOPS = 1920.0
"""Per score with ``dropout_p`` > 0 (the math path draws and applies a mask): 12 ns (19.6 ns in all against 10)."""
SDPA_MASK_HEAD_FLOPS = 80_000.0
"""Per head with an ``attn_mask``: 500 ns (a bool mask is converted; +430 ns per 8 x 8 x 8 head measured)."""
SDPA_MASK_SCORE_FLOPS = 160.0
"""Per score with an ``attn_mask``: 1 ns (+0.1-0.4 ns per score at L = S = 512-2048)."""


def _pool(args: list, kwargs: Mapping, out: TensorMeta, *, copies: bool = False) -> OpCost:
    """``copies``: the executor runs it on channels-last copies of its input and output
    (``modelgraph.execute.max_pool2d_channels_last``), scratch of one input and one output."""
    x = args[0] if args else kwargs.get("self")
    nsp = max(len(out.shape) - 2, 1)
    k = _ints(_arg(args, kwargs, 1, "kernel_size", 1), nsp)
    ws = (_numel(x) * _itemsize(x) + _numel(out) * _itemsize(out)) if copies and isinstance(x, TensorMeta) else 0
    return OpCost(float(_numel(out) * math.prod(k)) + (_numel(x) if isinstance(x, TensorMeta) else 0), ws)


# Ops whose work is not one pass over their declared tensors (session 15, attack15): the default rule (one FLOP
# per element touched) let a few hundred bytes of slice run one op for tens of seconds past the per-op budget.
# Their rules count work in matmul-equivalent FLOPs: the work units below times a factor, the time one unit took
# on this project's 2-core machine (torch 2.13, one intra-op thread) x the float32 matmul rate measured the same way
# (``measure_device_flops``), rounded up (docs/results/attack/session15/op_factors.txt).
RNN_FACTOR = 5.0
"""Per FLOP of an RNN's matrix products (2 x steps x the params' elements) at a batch under ``RNN_BATCH``: LSTM/GRU/RNN
cells of 256-1024 units ran at 1.5-4.1x the matmul rate's time at batch 4, a 2-layer 512-unit LSTM at 1.75x at batch 1
(session 15's lead; session 15 set 8.0 first, which refused that LSTM at batch 32, 329 ms real, as 2.2-4.4 s)."""
RNN_BATCHED_FACTOR = 3.0
"""As ``RNN_FACTOR`` from a batch of ``RNN_BATCH`` rows: each step's products are matrix-matrix, 0.6-2.3x measured
(LSTM 0.6 at batch 32 and 64, GRU 2.3 and RNN 1.3 at batch 64)."""
RNN_BATCH = 16
"""The batch from which an RNN is costed with ``RNN_BATCHED_FACTOR``."""
RNN_STEP_FLOPS = 4e6
"""Per time step of each layer and direction (the kernel's per-step dispatch): a GRU of 64 units took 12 us a
step, 1.1e6 matmul FLOPs' time; a long sequence of tiny cells costs this, not its products."""
INDEX_PUT_FACTOR = 128.0
"""Per element written by ``index_put`` (broadcast index count x the elements each index addresses; 42-97
measured)."""
INDEX_PUT_ACC_FACTOR = 1024.0
"""Per element accumulated by ``index_put(accumulate=True)`` (49-663 measured, distinct rows the dearest)."""
EMBEDDING_BAG_FACTOR = 128.0
"""Per element summed by ``embedding_bag`` (indices x embedding size; 1.8-93 measured, random rows the dearest)."""
SORT_SCRATCH_BYTES = 8
"""Per element sorted, beyond the element itself: ``sort`` / ``argsort`` held 8.1 B per element of scratch past
their outputs (float32 [1, 8M], stable or not; break33)."""
SORT_FACTOR = 2048.0
"""Per n log2(n) of ``sort`` / ``argsort`` along a dim (242-1175 measured) and n log2(k + 1) of ``topk`` (105-488)."""
GRID_SAMPLER_FACTOR = {0: 2048.0, 1: 1024.0, 2: 8192.0}
"""Per output element of ``grid_sampler`` by interpolation mode (0 bilinear, 1 nearest, 2 bicubic; 935-1252, 513-713
and 4088-4176 measured)."""
UPSAMPLE_FACTOR = {"upsample_nearest2d": 512.0, "upsample_bilinear2d": 512.0, "upsample_bicubic2d": 2048.0}
"""Per output element of the upsampling kernels (250, 320 and 805 measured at 2x)."""
COMPLEX_MATH_FACTOR = 8192.0
"""Per element touched (inputs and outputs) by a transcendental elementwise op on a complex tensor (``_COMPLEX_MATH``):
complex64 / complex128 took 30-102 / 19-71 ns per element at 90 GFLOP/s (final15, one thread: 2243-4589
matmul-equivalent FLOPs per element touched, ``pow.Tensor_Scalar`` the dearest), which the one-FLOP-per-element rule
(x4 for complex) counted 340-1150x too cheap: a 2-op slice of 0.3 KB (a complex64 factory of 512 MiB, ``pow``) held
the compute worker for seconds past the 2 s per-op budget. float32/float64 math is 3-264x but the per-tensor cap
bounds it under the budget."""
_COMPLEX_MATH = frozenset({"exp", "log", "sqrt", "rsqrt", "pow", "tanh", "sigmoid", "silu", "softmax", "_softmax",
                           "log_softmax", "_log_softmax", "erf", "gelu", "mish", "softplus", "elu", "hardswish"})
_RNNS = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})


def _touched(args: list, kwargs: Mapping, outputs: tuple[TensorMeta, ...]) -> int:
    """Elements of every tensor argument (lists included) and every output."""
    n = sum(_numel(m) for m in outputs)
    for a in [*args, *kwargs.values()]:
        if isinstance(a, TensorMeta):
            n += _numel(a)
        elif isinstance(a, list):
            n += sum(_numel(t) for t in a if isinstance(t, TensorMeta))
    return n


def _rnn(args: list, kwargs: Mapping, outputs: tuple[TensorMeta, ...]) -> OpCost:
    """``lstm.input`` / ``gru.input`` / ``rnn_*.input`` (input, hx, params, ...): every parameter matrix is used
    once per time step and batch row (steps = input elements / input size, any layout); on the CPU each layer's
    input projection for all steps is computed at once (steps x gate rows), and each layer's output is kept."""
    x = _arg(args, kwargs, 0, "input", None)
    params = _arg(args, kwargs, 2, "params", [])
    if not isinstance(x, TensorMeta) or not x.shape or not isinstance(params, list):
        return OpCost(float(_touched(args, kwargs, outputs)), 0)
    steps = _numel(x) // max(x.shape[-1], 1)
    batch_first = bool(_arg(args, kwargs, 8, "batch_first", False))
    seq = x.shape[1] if batch_first and len(x.shape) == 3 else x.shape[0]
    ps = [p for p in params if isinstance(p, TensorMeta)]
    weights = sum(_numel(p) for p in ps)
    mats = [p for p in ps if len(p.shape) == 2]
    rows = sum(p.shape[0] for p in mats)
    cells = max(1, (len(mats) + 1) // 2)  # layers x directions: a w_ih and a w_hh each (and a w_hr with proj_size)
    factor = RNN_BATCHED_FACTOR if steps // max(seq, 1) >= RNN_BATCH else RNN_FACTOR
    flops = factor * 2.0 * steps * weights + RNN_STEP_FLOPS * seq * cells + _touched(args, kwargs, outputs)
    return OpCost(flops * _dtype_factor(x), int(steps * rows * max(_itemsize(x), 4)))


def _index_put(args: list, kwargs: Mapping, outputs: tuple[TensorMeta, ...]) -> OpCost:
    """``index_put(self, indices, values, accumulate)``: each of the broadcast index tuples writes the elements
    of ``self`` the non-indexed dims span."""
    x = _arg(args, kwargs, 0, "self", None)
    indices = _arg(args, kwargs, 1, "indices", [])
    acc = bool(_arg(args, kwargs, 3, "accumulate", False))
    touched = _touched(args, kwargs, outputs)
    if not isinstance(x, TensorMeta) or not isinstance(indices, list):
        return OpCost(float(touched), 0)
    idx = [(d, t) for d, t in enumerate(indices) if isinstance(t, TensorMeta)]
    try:
        n_idx = math.prod(torch.broadcast_shapes(*(t.shape for _, t in idx))) if idx else 1
    except RuntimeError:
        n_idx = max((_numel(t) for _, t in idx), default=1)
    # a bool mask indexes as many dims as it has; an integer index one
    covered: list[int] = []
    d = 0
    for t in indices:
        k = len(t.shape) if isinstance(t, TensorMeta) and t.dtype == "bool" else 1
        if isinstance(t, TensorMeta):
            covered.extend(range(d, d + k))
        d += k
    indexed = math.prod(x.shape[i] for i in covered if i < len(x.shape))
    inner = _numel(x) // max(indexed, 1)
    elems = n_idx * max(inner, 1)
    factor = INDEX_PUT_ACC_FACTOR if acc else INDEX_PUT_FACTOR
    return OpCost(factor * elems * _dtype_factor(x) + touched, 0)


def _embedding_bag(args: list, kwargs: Mapping, outputs: tuple[TensorMeta, ...]) -> OpCost:
    """``embedding_bag(weight, indices, offsets, ...)``: every index adds one row of the weight."""
    w, idx = _arg(args, kwargs, 0, "weight", None), _arg(args, kwargs, 1, "indices", None)
    touched = _touched(args, kwargs, outputs)
    if not isinstance(w, TensorMeta) or not isinstance(idx, TensorMeta) or not w.shape:
        return OpCost(float(touched), 0)
    return OpCost(EMBEDDING_BAG_FACTOR * _numel(idx) * w.shape[-1] * _dtype_factor(w) + touched, 0)


def _sort(name: str, args: list, kwargs: Mapping, outputs: tuple[TensorMeta, ...]) -> OpCost:
    """``sort`` / ``argsort``: n log2 of the sorted dim's length; ``topk``: n log2(k + 1).

    Scratch (break33 H1, measured on torch 2.13's CPU kernels, dense or stride-0 input alike): ``topk`` keeps a
    (value, int64) queue of every slice it reads, max(item size, 8) + 8 bytes per input element whatever ``k`` (a
    684-byte slice, ``topk(expand(full([1, 1]), [1, 80M]), 1)``, took the server from 363 to 1586 MiB, costed 0);
    ``sort`` an element's worth and ``SORT_SCRATCH_BYTES`` per element; ``argsort`` that and the sorted values it
    throws away (32 MiB float32 input: 161 MiB of peak, 64 of them the indices)."""
    x = _arg(args, kwargs, 0, "self", None)
    touched = _touched(args, kwargs, outputs)
    if not isinstance(x, TensorMeta):
        return OpCost(float(touched), 0)
    n = _numel(x)
    if name == "topk":
        k = _arg(args, kwargs, 1, "k", 1)
        depth = math.log2((k if isinstance(k, int) and k > 0 else 1) + 1)
    else:
        dim = _arg(args, kwargs, 1, "dim", -1)  # sort/argsort .default: (self, dim, ...); .stable: dim keyword-only
        dims = x.shape or (1,)
        length = dims[dim] if isinstance(dim, int) and not isinstance(dim, bool) and -len(dims) <= dim < len(dims) \
            else max(dims)
        depth = math.log2(max(length, 2))
    item = _itemsize(x)
    if name == "topk":  # ATen's CPU topk: a (value, int64) queue of each slice it reads, whatever k (break33 H1)
        ws = n * (max(item, 8) + 8)
    elif name == "argsort":  # argsort is sort with the values thrown away: they are allocated all the same
        ws = n * (item + SORT_SCRATCH_BYTES) + n * item
    else:
        ws = n * (item + SORT_SCRATCH_BYTES)
    return OpCost(SORT_FACTOR * n * depth + touched, int(ws))


def _u8_separable_scratch(name: str, args: list, kwargs: Mapping, out: TensorMeta) -> int:
    """Bytes of the intermediate a uint8 bilinear / bicubic upsampling allocates between its two one-dimensional
    passes: N x max(C, 4) x (input rows x output columns, or output rows x input columns), whichever pass goes
    first (break28 F6: a 489-byte slice upsampling [1, 4, 262144, 1] to [1, 4, 1, 2048] took the server from 0.4 to
    2.5 GB for about 2 s, costed as its 8,192 output bytes; a 4 MiB input asked for 32 GiB). 0 for other dtypes."""
    x = args[0] if args else kwargs.get("self")
    if name == "upsample_nearest2d" or not isinstance(x, TensorMeta) or x.dtype != "uint8" or len(x.shape) != 4:
        return 0
    if len(out.shape) != 4:
        return 0
    n, c, h_in, w_in = x.shape
    h_out, w_out = out.shape[2], out.shape[3]
    return n * max(c, 4) * max(h_in * w_out, h_out * w_in)


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
        return _matmul(name, args, out, device)
    if name == "scaled_dot_product_attention":
        return _sdpa(args, kwargs, out)
    if "pool" in name and "adaptive" not in name:
        return _pool(args, kwargs, out, copies=name == "max_pool2d" and len(out.shape) == 4)
    if name in _RNNS:
        return _rnn(args, kwargs, outputs)
    if name == "index_put":
        return _index_put(args, kwargs, outputs)
    if name in ("embedding_bag", "_embedding_bag"):
        return _embedding_bag(args, kwargs, outputs)
    if name in ("sort", "argsort", "topk"):
        return _sort(name, args, kwargs, outputs)
    if name in ("grid_sampler", "grid_sampler_2d"):
        mode = _arg(args, kwargs, 2, "interpolation_mode", 2)
        factor = GRID_SAMPLER_FACTOR.get(mode if isinstance(mode, int) else 2, max(GRID_SAMPLER_FACTOR.values()))
        return OpCost(factor * _numel(out) * _dtype_factor(out) + _touched(args, kwargs, outputs), 0)
    if name in UPSAMPLE_FACTOR:
        ws = _u8_separable_scratch(name, args, kwargs, out)
        work = UPSAMPLE_FACTOR[name] * (_numel(out) * _dtype_factor(out) + ws)
        return OpCost(work + _touched(args, kwargs, outputs), ws)
    tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, TensorMeta)]
    for a in [*args, *kwargs.values()]:
        if isinstance(a, list):
            tensors.extend(t for t in a if isinstance(t, TensorMeta))
    touched = sum(_numel(t) for t in tensors) + sum(_numel(m) for m in outputs)
    if name in _COMPLEX_MATH and any(t.dtype.startswith("complex") for t in (*tensors, *outputs)):
        return OpCost(COMPLEX_MATH_FACTOR * touched, 0)
    per = 8.0 if ("norm" in name or "softmax" in name or name in ("var", "std", "gelu", "erf")) else 1.0
    factor = _dtype_factor(out) if outputs else 1.0
    return OpCost(per * touched * factor, 0)


_FRESH, _VIEW, _MAY_ALIAS = 0, 1, 2


def _alias_kind(target: str) -> int:
    """``_FRESH``, ``_VIEW`` or ``_MAY_ALIAS`` for an op target (``aten.<name>.<overload>``)."""
    name = _short(target)
    return _VIEW if name in _VIEWS else _MAY_ALIAS if name in _MAY_ALIAS_OPS else _FRESH


def _first_ref(op: OpNode) -> TensorRef | WeightRef | None:
    """The op's first argument when it is a tensor: positional, as the slice parser puts every allowlisted call
    (``modelgraph.allowlist.positional_form``; break32 G3: ``dropout(input=view)`` by name escaped the groups)."""
    args = op.template[0]
    a = args[0] if args else None
    return a if isinstance(a, TensorRef | WeightRef) else None


def _dense_copies(op: OpNode, sparse: set[str], sparse_w: set[str], lookup) -> int:
    """Logical bytes (elements x item size) of each not-dense tensor argument of ``op`` (each time it is passed),
    the copy a kernel that needs dense memory makes of it; 0 for the ops in ``_STRIDED_OK``."""
    if _short(op.target) in _STRIDED_OK:
        return 0
    n = 0
    for ref in op.refs:
        if (ref.name in sparse) if type(ref) is TensorRef else (ref.name in sparse_w):
            n += lookup(ref).nbytes
    return n


def _operand_copies(op: OpNode, known: set[str], strides: Mapping[str, tuple[int, ...]],
                    wstrides: Mapping[str, tuple[int, ...]], lookup, memo: dict) -> int | None:
    """:func:`matmul_copy_bytes` of a matrix product whose two operands' run-time strides are trusted (float32 /
    float64), else None (the conservative rule stands). ``memo``: by (op, dtype, shapes, strides)."""
    name = _short(op.target)
    args = op.template[0]
    pos = (1, 2) if name in ("addmm", "baddbmm") else (0, 1)
    if len(args) <= pos[1]:
        return None
    shapes, sts = [], []
    for ref in (args[pos[0]], args[pos[1]]):
        if type(ref) is TensorRef:
            st = strides.get(ref.name) if ref.name in known else None
        elif type(ref) is WeightRef:
            st = wstrides.get(ref.name)
        else:
            return None
        if st is None:
            return None
        m = lookup(ref)
        if m.dtype not in EXACT_MM_DTYPES:
            return None
        shapes.append(m.shape)
        sts.append(st)
    key = (name, lookup(args[pos[0]]).dtype, *shapes, *sts)
    got = memo.get(key)
    if got is None:
        got = memo[key] = matmul_copy_bytes(name, shapes[0], sts[0], shapes[1], sts[1],
                                            lookup(args[pos[0]]).itemsize)
    return got

_SDPA_TARGET = "aten.scaled_dot_product_attention.default"


def _sdpa_exact(op: OpNode, known: set[str], strides: Mapping[str, tuple[int, ...]],
                wstrides: Mapping[str, tuple[int, ...]], lookup, dev: torch.device) -> OpCost | None:
    """The flash kernel's cost of a CPU ``scaled_dot_product_attention`` whose q, k, v strides are trusted and
    let it run (:func:`_sdpa_flash_ready`), else None (the math path's cost stands)."""
    args, kwargs = op.template
    if len(args) < 3:
        return None
    sts = []
    for ref in args[:3]:
        if type(ref) is TensorRef:
            sts.append(strides.get(ref.name) if ref.name in known else None)
        elif type(ref) is WeightRef:
            sts.append(wstrides.get(ref.name))
        else:
            return None
    if not _sdpa_flash_ready(*(lookup(r) for r in args[:3]), tuple(sts), _arg(args, kwargs, 4, "dropout_p", 0.0)):
        return None
    return _sdpa(bind(args, lookup, dev), bind(kwargs, lookup, dev), op.outputs[0], flash=True)


def estimate_slice(spec: SliceSpec, order: tuple[OpNode, ...], device: torch.device,
                   nondense: Collection[str] = (), strides: Mapping[str, tuple[int, ...]] | None = None) -> SliceCost:
    """Per-op costs and the peak of live bytes of a validated slice run in ``order``.

    Live bytes: the cut tensors (the storage their declared strides span, as ``restore_layout`` allocates it), then
    each op's outputs (views count nothing), held as long as any tensor that shares their storage is (outputs of the
    slice stay); at each op the peak also holds that op's scratch. Storage is shared through aliases: a view
    (``_VIEWS``) or a may-alias op's output (``_MAY_ALIAS_OPS``) joins its first argument's alias group (views of
    views too), and a group's bytes are freed only after the last reader of any of its members ran (break31 F3: the
    estimate freed a base after its own last reader while a later-read ``narrow`` of it kept its whole storage:
    8 x (a 128 MiB ``full``, a 1-element ``narrow``), then a ``cat`` of the 8 views, held 1483 MiB of RSS against an
    estimate of about 128 MiB). A functional ``copy`` / ``slice_scatter`` / ``select_scatter`` is its declared
    output: the run-time guard keeps it from cloning its ``self``'s whole storage (``runtime_guards.COMPACT_SELF``,
    break31 F2).
    Weights are reported apart (the store holds them for requests; profiling makes random ones); a view of a weight
    pins nothing counted here.
    Linear in the slice size: an op's cost depends only on its target, its arguments and the metadata
    of its tensors, so ops with the same call skeleton (``OpNode.call_skeleton``: arguments with
    type-tagged scalars, references as slots), the same metadata object at each tensor and weight slot
    and the same output metadata objects share one estimate (metadata keyed by object identity: the
    parser shares one object per distinct metadata, every object is alive while this runs, and a miss
    is only slower). Alias groups: one dict entry per tensor ref.
    ``nondense``: the refs whose layout is not dense (stride 0 or gaps: ``SliceProgram.nondense``, from the meta
    propagation); a view or may-alias output of one is taken as not dense too (whatever it declares). An op that
    reads one, unless it is in ``_STRIDED_OK``, also holds a dense copy of it: its logical bytes count as scratch
    (break33 H2: ``linear`` of a 1 GiB ``expand`` of one element copied it whole, costed 0).
    ``strides``: the run-time strides of the refs whose layout the spec pins (``SliceProgram.strides``, from the
    meta propagation). A ref's are trusted when it is a cut tensor in ``strides``, or an output of an op in
    ``_CONTIGUOUS_OUT`` (contiguous), or of an op in ``_LAYOUT_FROM_INPUTS`` all of whose tensor inputs are trusted;
    a weight's are its declared ones (contiguous if none) when ``restore_layout`` can give them. On a CPU, a float32 /
    float64 matrix product (``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``matmul``) whose two operands' strides are
    trusted is costed the copies ATen makes of them (:func:`matmul_copy_bytes`), not both operands' logical bytes
    (break34: a 2-layer BERT-base-width slice, ``probs @ v`` with ``v`` a head view of the fused qkv buffer, was
    costed 54 MiB of scratch where ATen copies only ``v``, 6 MiB, and refused at ``--memory-mb 1024``). Without
    ``strides`` (None) every matrix product keeps the conservative rule.
    """
    metas: dict[str, TensorMeta] = dict(spec.inputs)
    weights = {k: w.meta for k, w in spec.weights.items()}
    n = len(order)
    keep = set(spec.outputs)
    last: dict[str, int] = {}  # ref -> position of its last reader
    group: dict[str, str] = {}  # ref -> the first tensor of its alias group (the storage it keeps alive)
    own: dict[str, int] = {}  # bytes each ref allocated itself (0 for a view)
    produced: dict[str, int] = {}  # ref -> position of the op that made it
    kinds: dict[str, int] = {}
    sparse = set(nondense)
    sparse_w = {k for k, w in spec.weights.items() if w.meta.stride is not None
                and not dense_layout(w.meta.shape, w.meta.stride)}

    for r, m in spec.inputs.items():
        group[r], own[r] = r, max(m.nbytes, m.storage_nbytes)
    exact = strides is not None and torch.device(device).type == "cpu"
    known: set[str] = {r for r in spec.inputs if r in strides} if exact else set()
    wstrides: dict[str, tuple[int, ...]] = {}
    if exact:
        for k, w in spec.weights.items():
            st = w.meta.stride if w.meta.stride is not None else contiguous_strides(w.meta.shape)
            if restorable_layout(w.meta.shape, st):
                wstrides[k] = st
    for i, op in enumerate(order):
        for r in op.tensor_inputs:
            last[r] = i
        if exact:
            short = _short(op.target)
            if short in _CONTIGUOUS_OUT:
                known.update(r for r, m in zip(op.output_refs(), op.outputs)
                             if strides.get(r) == contiguous_strides(m.shape))
            elif short in _LAYOUT_FROM_INPUTS and known.issuperset(op.tensor_inputs) \
                    and all(w in wstrides for w in op.weight_inputs):
                known.update(r for r in op.output_refs() if r in strides)
        kind = kinds.get(op.target)
        if kind is None:
            kind = kinds[op.target] = _alias_kind(op.target)
        if not op.multi and kind == _FRESH:  # most ops
            r, m = op.name, op.outputs[0]
            metas[r], produced[r], own[r], group[r] = m, i, m.nbytes, r
            continue
        src = _first_ref(op) if kind != _FRESH else None
        base = group[src.name] if type(src) is TensorRef else None
        taint = src is not None and (src.name in sparse if type(src) is TensorRef else src.name in sparse_w)
        for r, m in zip(op.output_refs(), op.outputs) if op.multi else ((op.name, op.outputs[0]),):
            metas[r], produced[r], own[r] = m, i, 0 if kind == _VIEW else m.nbytes
            group[r] = r if base is None else base
            if taint:
                sparse.add(r)
    # a group is freed after the last reader of any member ran; never if a member is kept, or is a cut tensor
    # nothing reads (the run holds it to the end); right after its op for an output nothing reads
    release: dict[str, int] = {}
    group_bytes: dict[str, int] = {}
    last_get, produced_get, release_get, bytes_get = last.get, produced.get, release.get, group_bytes.get
    for r, g in group.items():
        at = n if r in keep else last_get(r, produced_get(r, n))
        if at > release_get(g, -1):
            release[g] = at
        group_bytes[g] = bytes_get(g, 0) + own[r]
    free_at: dict[int, list[str]] = {}
    for g, at in release.items():
        if at < n:
            free_at.setdefault(at, []).append(g)
    tensor_meta, weight_meta = metas.__getitem__, weights.__getitem__

    def lookup(ref: TensorRef | WeightRef) -> TensorMeta:
        return metas[ref.name] if isinstance(ref, TensorRef) else weights[ref.name]

    live = sum(own[r] for r in spec.inputs)
    peak = live
    costs: list[OpCost] = []
    dev = torch.device(device)
    memo: dict[tuple, OpCost] = {}
    mm_memo: dict[tuple, int] = {}
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
        if exact and cost.workspace_bytes and _short(op.target) in _MM_FAMILY:
            copies = _operand_copies(op, known, strides, wstrides, lookup, mm_memo)
            if copies is not None:
                cost = OpCost(cost.flops, copies, cost.serial_flops)
        elif exact and cost.flops and op.target == _SDPA_TARGET:
            cost = _sdpa_exact(op, known, strides, wstrides, lookup, dev) or cost
        if (sparse and not sparse.isdisjoint(op.tensor_inputs)) or (sparse_w and not sparse_w.isdisjoint(ws)):
            copies = _dense_copies(op, sparse, sparse_w, lookup)
            if copies:
                cost = OpCost(cost.flops, cost.workspace_bytes + copies, cost.serial_flops)
        costs.append(cost)
        out_bytes = sum(own[r] for r in op.output_refs()) if op.multi else own[op.name]
        now = live + out_bytes + cost.workspace_bytes
        if now > peak:
            peak = now
        live += out_bytes
        for g in free_at.get(i, ()):  # the groups whose last reader (of any alias) this op was
            live -= group_bytes[g]
    return SliceCost(
        tuple(costs), int(peak), sum(m.nbytes for m in weights.values()), float(sum(c.flops for c in costs))
    )


def _timed_flops(target: str, dtype: str, c: OpCost, limits: OpLimits,
                 slow: Mapping[str, tuple[float, float]]) -> tuple[float, float | None]:
    """(the op's FLOPs as the budget times them, at ``limits.device_flops``; the slow dtype's rate that applied or
    None): a GEMM-family op in a slow dtype at that dtype's rate (never cheaper than counted), serial work at one
    thread's rate."""
    rate = None
    if slow and dtype in slow and (short := _short(target)) in _GEMM_OPS:
        rate = slow[dtype][1 if short.startswith("conv") else 0]
    serial = c.serial_flops
    flops = (c.flops - serial) * (max(limits.device_flops / rate, 1.0) if rate else 1.0) \
        + serial * max(limits.threads, 1)
    return flops, rate


def priced_seconds(target: str, dtype: str, cost: OpCost, limits: OpLimits) -> float:
    """Seconds the op budget expects one op to take: ``cost`` (:func:`estimate_op`) of an op ``target``
    (``aten.bmm.default``) whose first output has ``dtype`` (``"float32"``), timed as :func:`check_slice_budget`
    times it under ``limits`` (``device_flops``, the slow dtypes' rates, ``threads``). No errors."""
    flops, _ = _timed_flops(target, dtype, cost, limits, {r[0]: (r[1], r[2]) for r in limits.slow_gemm_rates})
    return flops / limits.device_flops


def check_slice_budget(spec: SliceSpec, order: tuple[OpNode, ...], cost: SliceCost, limits: OpLimits) -> None:
    """Raise :class:`OpOverBudget` naming the first op over the scratch or time budget (or the peak)."""
    max_flops = limits.max_flops
    slow = {r[0]: (r[1], r[2]) for r in limits.slow_gemm_rates}
    for op, c in zip(order, cost.ops):
        flops, rate = _timed_flops(op.target, op.outputs[0].dtype if op.outputs else "", c, limits, slow)
        serial = c.serial_flops
        if c.workspace_bytes > limits.max_workspace_bytes:
            raise OpOverBudget(
                f"op {op.name!r} ({op.target}) would need about {c.workspace_bytes / 2**20:.0f} MiB of kernel "
                f"scratch; the per-op limit is {limits.max_workspace_bytes / 2**20:.0f} MiB"
            )
        if flops > max_flops:
            raise OpOverBudget(
                f"op {op.name!r} ({op.target}) would take about {flops / limits.device_flops * 1e3:.0f} ms "
                f"({c.flops / 1e9:.1f} GFLOP"
                + (f" at {rate / 1e9:.2f} GFLOP/s: no fast {op.outputs[0].dtype} kernel on this server"
                   if rate else "")
                + (f", {serial / 1e9:.1f} of them per-matrix work at one thread's rate" if serial else "")
                + f"); the per-op time budget is {limits.max_op_ms:.0f} ms"
            )
    if limits.max_peak_bytes and cost.peak_bytes > limits.max_peak_bytes:
        raise OpOverBudget(
            f"the slice would hold about {cost.peak_bytes / 2**20:.0f} MiB at once while running; "
            f"the limit is {limits.max_peak_bytes / 2**20:.0f} MiB"
        )
