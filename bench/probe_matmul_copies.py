"""The operand copies of torch's CPU matrix products, measured, against ``op_budget.matmul_copy_bytes``.

For each case (an op, two operand layouts: contiguous, transposed, permuted batch dims that merge or not, stride-0
broadcasts in batch or matrix dims, gapped slices, 1-D to 5-D, broadcast batch shapes), the op runs once under
torch's profiler with ``profile_memory``: every allocation and free of torch's CPU allocator in order, whose running
sum's peak less the output's bytes is the op's scratch (the copies ATen made of its operands; ``malloc`` outside
torch's allocator, e.g. MKL's batched-gemm pointer arrays, is not seen: the rule adds it). Printed per case: the
measured scratch, the new rule's charge (``matmul_copy_bytes`` for float32 / float64, the old rule for other
dtypes), the old rule's (both operands' logical bytes over the broadcast batch), and ``UNDER`` where the charge is
below the measurement (none may be). torch 2.13, CPU, one intra-op thread, ``inference_mode``.

Usage: ``python bench/probe_matmul_copies.py > docs/results/kernels/matmul_copies.txt`` (~20 s).
"""

import functools
import math
import sys

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from edge_server.op_budget import (
    EXACT_MM_DTYPES,
    GEMM_BATCH_POINTER_BYTES,
    HALF_MM_DTYPES,
    HALF_MM_SCRATCH,
    matmul_copy_bytes,
)

A = torch.ops.aten
DT = torch.float32


def contig(*shape, dtype=None):
    return torch.rand(shape, dtype=dtype or DT)


def trans(*shape):
    """Last two dims transposed (column-major matrices)."""
    return torch.rand((*shape[:-2], shape[-1], shape[-2]), dtype=DT).transpose(-1, -2)


def perm(shape, order):
    """A tensor of ``shape`` laid out as the permutation ``order`` of a contiguous one."""
    base = torch.rand([shape[i] for i in order], dtype=DT)
    inv = [order.index(i) for i in range(len(shape))]
    return base.permute(inv)


def expand(shape, base):
    return torch.rand(base, dtype=DT).expand(shape)


def gap_cols(*shape):
    """Every other element of each row (stride 2 in the last dim)."""
    return torch.rand((*shape[:-1], 2 * shape[-1]), dtype=DT)[..., ::2]


def ld_rows(*shape):
    """Row-major with a leading dimension wider than the row (a narrow of the columns: BLAS-ready)."""
    return torch.rand((*shape[:-1], shape[-1] + 8), dtype=DT)[..., : shape[-1]]


def qkv_view(B, T, H, E, which=2):
    """BERT's fused qkv split into heads: [B, H, T, E] view of a [B, T, 3*H*E] buffer (batch dims do not merge)."""
    buf = torch.rand(B, T, 3 * H * E, dtype=DT)
    return buf[..., which * H * E:(which + 1) * H * E].view(B, T, H, E).permute(0, 2, 1, 3)


def cases():
    m, k, n = 64, 48, 40
    C = []

    def add(label, op, a, b, bias=None):
        C.append((label, op, a, b, bias))

    # mm / addmm: 2-D layouts of each operand
    layouts2 = {
        "contig": lambda r, c: contig(r, c),
        "trans": lambda r, c: trans(r, c),
        "ld>cols": lambda r, c: ld_rows(r, c),
        "gap": lambda r, c: gap_cols(r, c),
        "expand0row": lambda r, c: expand((r, c), (1, c)),
        "expand0col": lambda r, c: expand((r, c), (r, 1)),
        "expand0all": lambda r, c: expand((r, c), (1, 1)),
    }
    for la, fa in layouts2.items():
        for lb, fb in layouts2.items():
            add(f"mm a={la} b={lb}", "mm", fa(m, k), fb(k, n))
    add("addmm bias=expand a=gap b=trans", "addmm", gap_cols(m, k), trans(k, n), expand((n,), (1,)))
    add("addmm bias=[m,n] a=contig b=expand0all", "addmm", contig(m, k), expand((k, n), (1, 1)), contig(m, n))
    # bmm / baddbmm: 3-D layouts (per-matrix strides, batch stride free)
    B = 6
    layouts3 = {
        "contig": lambda r, c: contig(B, r, c),
        "trans": lambda r, c: trans(B, r, c),
        "batch-inner": lambda r, c: perm((B, r, c), [1, 0, 2]),
        "bcast0": lambda r, c: expand((B, r, c), (1, r, c)),
        "gap": lambda r, c: gap_cols(B, r, c),
        "expand0col": lambda r, c: expand((B, r, c), (B, r, 1)),
        "expand0all": lambda r, c: expand((B, r, c), (1, 1, 1)),
    }
    for la, fa in layouts3.items():
        for lb, fb in layouts3.items():
            add(f"bmm a={la} b={lb}", "bmm", fa(m, k), fb(k, n))
    add("baddbmm self=expand a=gap b=bcast0", "baddbmm", gap_cols(B, m, k), expand((B, k, n), (1, k, n)),
        expand((B, m, n), (1, 1, n)))
    add("baddbmm self=contig a=trans b=contig", "baddbmm", trans(B, m, k), contig(B, k, n), contig(B, m, n))
    # matmul: 1-D .. 5-D, folds, broadcasts, permuted batch dims
    mm_cases = [
        ("1D@1D", contig(k), contig(k)),
        ("1D gap@1D expand", gap_cols(k), expand((k,), (1,))),
        ("2D@1D", contig(m, k), contig(k)),
        ("2D gap@1D gap", gap_cols(m, k), gap_cols(k)),
        ("2D expand0all@1D expand", expand((m, k), (1, 1)), expand((k,), (1,))),
        ("1D@2D", contig(k), contig(k, n)),
        ("1D gap@2D gap", gap_cols(k), gap_cols(k, n)),
        ("2D@2D trans", contig(m, k), trans(k, n)),
        ("2D gap@2D expand0col", gap_cols(m, k), expand((k, n), (k, 1))),
        ("3D contig@2D (fold)", contig(4, m, k), contig(k, n)),
        ("3D trans@2D (no fold)", trans(4, m, k), contig(k, n)),
        ("3D batch-inner@2D (no fold)", perm((4, m, k), [1, 0, 2]), contig(k, n)),
        ("3D expand0batch@2D (no fold)", expand((4, m, k), (1, m, k)), contig(k, n)),
        ("3D expand0all@2D (fold, clone)", expand((4, m, k), (1, 1, 1)), contig(k, n)),
        ("4D contig@2D gap (fold)", contig(2, 3, m, k), gap_cols(k, n)),
        ("4D contig@1D (fold mv)", contig(2, 3, m, k), contig(k)),
        ("4D permuted@1D", perm((2, 3, m, k), [0, 2, 1, 3]), contig(k)),
        ("1D@3D", contig(k), contig(4, k, n)),
        ("1D gap@3D trans", gap_cols(k), trans(4, k, n)),
        ("1D@3D [k,1] (fold)", contig(k), contig(4, k, 1)),
        ("2D@3D", contig(m, k), contig(4, k, n)),
        ("2D trans@3D gap", trans(m, k), gap_cols(4, k, n)),
        ("3D@3D", contig(4, m, k), contig(4, k, n)),
        ("3D@3D bcast [1,k,n]", contig(4, m, k), contig(1, k, n)),
        ("3D bcast [1,m,k]@3D", contig(1, m, k), contig(4, k, n)),
        ("3D@1D", contig(4, m, k), contig(k)),
        ("3D batch-inner@1D gap", perm((4, m, k), [1, 0, 2]), gap_cols(k)),
        ("4D@4D", contig(2, 3, m, k), contig(2, 3, k, n)),
        ("4D@4D trans", contig(2, 3, m, k), trans(2, 3, k, n)),
        ("4D@4D heads-permuted b", contig(2, 3, m, k), perm((2, 3, k, n), [0, 2, 1, 3])),
        ("4D heads-permuted@4D", perm((2, 3, m, k), [0, 2, 1, 3]), contig(2, 3, k, n)),
        ("4D batch-swapped@4D", perm((2, 3, m, k), [1, 0, 2, 3]), contig(2, 3, k, n)),
        ("4D@4D bcast [2,1,k,n]", contig(2, 3, m, k), contig(2, 1, k, n)),
        ("4D@4D bcast [1,3,k,n]", contig(2, 3, m, k), contig(1, 3, k, n)),
        ("4D@4D expand0 [2,3] of [1,3]", contig(2, 3, m, k), expand((2, 3, k, n), (1, 3, k, n))),
        ("4D@4D expand0 [2,3] of [2,1]", contig(2, 3, m, k), expand((2, 3, k, n), (2, 1, k, n))),
        ("4D@4D expand0 all batch", contig(2, 3, m, k), expand((2, 3, k, n), (1, 1, k, n))),
        ("4D expand0col@4D", expand((2, 3, m, k), (2, 3, m, 1)), contig(2, 3, k, n)),
        ("4D gap@4D gap", gap_cols(2, 3, m, k), gap_cols(2, 3, k, n)),
        ("4D ld>cols@4D ld>cols", ld_rows(2, 3, m, k), ld_rows(2, 3, k, n)),
        ("4D@3D bcast", contig(2, 3, m, k), contig(3, k, n)),
        ("3D@4D bcast", contig(3, m, k), contig(2, 3, k, n)),
        ("5D@5D", contig(2, 2, 3, m, k), contig(2, 2, 3, k, n)),
        ("5D permuted@5D", perm((2, 2, 3, m, k), [2, 0, 1, 3, 4]), contig(2, 2, 3, k, n)),
        ("5D@5D bcast [1,2,1]", contig(2, 2, 3, m, k), contig(1, 2, 1, k, n)),
        ("5D@2D (fold)", contig(2, 2, 3, m, k), contig(k, n)),
        ("5D permuted@2D", perm((2, 2, 3, m, k), [0, 2, 1, 3, 4]), contig(k, n)),
        ("2D@5D", contig(m, k), contig(2, 2, 3, k, n)),
        ("1D@5D gap", contig(k), gap_cols(2, 2, 3, k, n)),
        ("5D@1D", contig(2, 2, 3, m, k), contig(k)),
        ("bert scores q@kT [4,12,T,64]", qkv_view(2, 128, 12, 64, 0), qkv_view(2, 128, 12, 64, 1).transpose(-1, -2)),
        ("bert probs@v [4,12,T,T]@view", contig(2, 12, 128, 128), qkv_view(2, 128, 12, 64, 2)),
    ]
    for label, a, b in mm_cases:
        add("matmul " + label, "matmul", a, b)
    # other dtypes (the helpers build in the global DT)
    global DT
    for dt in (torch.float64, torch.bfloat16, torch.float16):
        DT = dt
        name = str(dt).removeprefix("torch.")
        add(f"mm {name} a=gap b=expand0all", "mm", gap_cols(m, k), expand((k, n), (1, 1)))
        add(f"mm {name} a=gap b=trans", "mm", gap_cols(m, k), trans(k, n))
        add(f"bmm {name} a=batch-inner b=bcast0", "bmm", perm((B, m, k), [1, 0, 2]), expand((B, k, n), (1, k, n)))
        add(f"bmm {name} a=gap b=expand0all", "bmm", gap_cols(B, m, k), expand((B, k, n), (1, 1, 1)))
        add(f"matmul {name} 4D heads-permuted@4D", "matmul", perm((2, 3, m, k), [0, 2, 1, 3]), contig(2, 3, k, n))
        add(f"matmul {name} 4D@4D bcast [1,3,k,n]", "matmul", contig(2, 3, m, k), contig(1, 3, k, n))
        add(f"matmul {name} bert probs@v", "matmul", contig(2, 12, 128, 128), qkv_view(2, 128, 12, 64, 2))
    DT = torch.float32
    return C


def measure(fn) -> tuple[int, torch.Tensor]:
    """Peak of bytes held by torch's CPU allocator while ``fn`` runs (from 0 at its start), and its result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as p:
        out = fn()
    cur = peak = 0
    for e in sorted((e for e in p.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, out


def call(op, a, b, bias):
    if op in ("addmm", "baddbmm"):
        return getattr(A, op).default(bias, a, b)
    return getattr(A, op).default(a, b)


def old_rule(op, a, b) -> int:
    """The rule before: both operands' logical bytes over the broadcast batch (``op_budget._matmul``)."""
    ash = tuple(a.shape) if a.dim() > 1 else (1, *a.shape)
    bsh = tuple(b.shape) if b.dim() > 1 else (*b.shape, 1)
    batch = math.prod(torch.broadcast_shapes(ash[:-2], bsh[:-2]))
    return (batch * ash[-2] * ash[-1] + batch * bsh[-2] * bsh[-1]) * a.element_size()


def conservative_rule(op, a, b) -> int:
    """The rule without strides (``op_budget._matmul``): the old one, plus float32 buffers for half precision."""
    ash = tuple(a.shape) if a.dim() > 1 else (1, *a.shape)
    bsh = tuple(b.shape) if b.dim() > 1 else (*b.shape, 1)
    batch = math.prod(torch.broadcast_shapes(ash[:-2], bsh[:-2]))
    half = str(a.dtype).removeprefix("torch.") in HALF_MM_DTYPES
    extra = batch * (ash[-2] * ash[-1] + bsh[-2] * bsh[-1] + ash[-2] * bsh[-1]) * HALF_MM_SCRATCH
    return old_rule(op, a, b) + (extra if half else 0)


def main() -> int:
    torch.set_num_threads(1)
    under = 0
    print(f"torch {torch.__version__}, CPU, 1 thread; bytes. scratch = allocator peak - output bytes; "
          f"rule = matmul_copy_bytes (exact dtypes {sorted(EXACT_MM_DTYPES)}, incl. {GEMM_BATCH_POINTER_BYTES} B "
          f"per batched matrix of malloc'd pointers) or the conservative rule (other dtypes: both operands' "
          f"logical bytes, + HALF_MM_SCRATCH B per element of a, b, c for {sorted(HALF_MM_DTYPES)}); "
          f"old = the rule before (both operands)")
    print(f"{'case':58s} {'a shape/stride':>34s} {'b shape/stride':>34s} {'scratch':>9s} {'rule':>9s} {'old':>9s}")
    with torch.inference_mode():
        for label, op, a, b, bias in cases():
            fn = functools.partial(call, op, a, b, bias)
            fn()  # warm (first-call allocations of the profiler / kernels)
            peak, out = measure(fn)
            scratch = max(peak - out.untyped_storage().nbytes(), 0)
            dtype = str(a.dtype).removeprefix("torch.")
            old = old_rule(op, a, b)
            rule = matmul_copy_bytes(op, tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), a.element_size()) \
                if dtype in EXACT_MM_DTYPES else conservative_rule(op, a, b)
            flag = " UNDER" if rule < scratch else ""
            under += rule < scratch
            print(f"{label:58s} {str(list(a.shape)) + str(list(a.stride())):>34s} "
                  f"{str(list(b.shape)) + str(list(b.stride())):>34s} {scratch:9d} {rule:9d} {old:9d}{flag}")
    print(f"cases under the measurement: {under}")
    return 1 if under else 0


if __name__ == "__main__":
    sys.exit(main())
