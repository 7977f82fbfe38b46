"""break33 H1 and H2: kernels that allocate memory the op budget did not count, each fixed in
``edge_server.op_budget`` and checked here in process (the estimate against the bytes the run really takes).

Before the fixes: H1, ATen's CPU ``topk`` allocates a (value, int64) queue of 16 bytes per element it reads, whatever
``k``, and its rule had no scratch: a 684-byte spec ``full([1, 1])`` -> ``expand [1, 80M]`` -> ``topk(x, 1)`` took
``coinfer-edge serve --memory-mb 1024`` from 363 to 1586 MiB RSS, estimated at 0.00 MiB (``argsort`` also holds the
sorted values it throws away). H2, kernels that copy a stride-0 (or gapped) argument into dense memory while the
budget counts an ``expand`` as 0 bytes: ``linear`` of an ``expand [262144, 1024]`` 364 -> 1390 MiB (estimate 1 MiB),
``scaled_dot_product_attention`` with k = v = ``expand [1, 1, 4M, 64]`` -> 1410 MiB (estimate 48 MiB),
``avg_pool2d`` of an ``expand [1, 64, 65536, 64]`` -> 1386 MiB (estimate 0). Fix: scratch rules for
``topk`` / ``sort`` / ``argsort``, and the logical bytes of every argument whose layout is not dense
(``SliceProgram.nondense``) counted as the op's scratch unless the op is known to read strides in place
(``op_budget._STRIDED_OK``).
"""

from __future__ import annotations

import gc
import json

import pytest
import torch

from edge_server.errors import ResourceExhausted
from edge_server.op_budget import OpLimits
from edge_server.slices import compile_slice
from tests.test_break28 import FK, _op

MiB = 1 << 20


def _t(name: str) -> dict:
    return {"t": name}


def _m(shape, dtype="float32", stride=None) -> dict:
    d = {"shape": list(shape), "dtype": dtype}
    if stride is not None:
        d["stride"] = list(stride)
    return d


def _full(name: str, shape: list[int]) -> dict:
    return _op(name, "aten.full.default", [list(shape), 1.0], [_m(shape)], FK("float32"))


def _expand(name: str, shape: list[int], declared_stride=None) -> list[dict]:
    """``b = full([1] * rank)``, ``name = expand(b, shape)`` (declared with ``declared_stride``, by default the real
    all-zero one)."""
    stride = [0] * len(shape) if declared_stride is None else declared_stride
    return [_full(name + "_b", [1] * len(shape)),
            _op(name, "aten.expand.default", [_t(name + "_b"), list(shape)], [_m(shape, stride=stride)])]


def _json(ops: list[dict], outputs: list[str]) -> bytes:
    return json.dumps({"version": 1, "ops": ops, "inputs": {}, "outputs": outputs, "weights": {}}).encode()


def topk_spec(n: int) -> bytes:
    """H1: ``topk(expand(full([1, 1]), [1, n]), 1)``."""
    ops = [*_expand("x", [1, n]),
           _op("k", "aten.topk.default", [_t("x"), 1], [_m([1, 1]), _m([1, 1], "int64")], multi=True)]
    return _json(ops, ["k#0"])


def argsort_spec(n: int) -> bytes:
    ops = [*_expand("x", [1, n]), _op("a", "aten.argsort.default", [_t("x")], [_m([1, n], "int64")]),
           _op("s", "aten.sum.default", [_t("a")], [_m([], "int64")])]
    return _json(ops, ["s"])


def sort_spec(n: int) -> bytes:
    ops = [_full("x", [1, n]),
           _op("k", "aten.sort.default", [_t("x")], [_m([1, n]), _m([1, n], "int64")], multi=True)]
    return _json(ops, ["k#0", "k#1"])


def linear_spec(n: int, declared_stride=None, narrow: bool = False) -> bytes:
    """H2: ``linear(expand [n / 64, 64], w [1, 64])``; ``narrow``: through a ``narrow`` of the expand (rows 1..)."""
    rows = n // 64
    ops = [*_expand("x", [rows, 64], declared_stride), _full("w", [1, 64])]
    src = "x"
    if narrow:
        ops.append(_op("v", "aten.narrow.default", [_t("x"), 0, 1, rows - 1], [_m([rows - 1, 64])]))
        src, rows = "v", rows - 1
    ops.append(_op("y", "aten.linear.default", [_t(src), _t("w")], [_m([rows, 1])]))
    return _json(ops, ["y"])


def sdpa_spec(n: int) -> bytes:
    s = n // 64
    ops = [*_expand("k", [1, 1, s, 64]), _full("q", [1, 1, 1, 64]),
           _op("y", "aten.scaled_dot_product_attention.default", [_t("q"), _t("k"), _t("k")], [_m([1, 1, 1, 64])])]
    return _json(ops, ["y"])


def avg_pool2d_spec(n: int) -> bytes:
    h = n // 64 // 64
    ops = [*_expand("x", [1, 64, h, 64]),
           _op("y", "aten.avg_pool2d.default", [_t("x"), [h, 64]], [_m([1, 64, 1, 1])])]
    return _json(ops, ["y"])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_growth(spec: bytes) -> tuple[int, int]:
    """(the op budget's estimated peak, the growth of this process's peak RSS while the compiled slice ran, as the
    server runs it): the peak RSS (VmHWM) is restarted from the RSS now (``clear_refs`` 5) before the run. The
    tensors are over glibc's largest mmap threshold (32 MiB), so each allocation maps fresh pages."""
    cs = compile_slice(spec, require_hashes=False, op_limits=OpLimits(max_op_ms=1e9))  # memory only here
    torch.set_num_threads(1)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    with torch.inference_mode():
        out = cs.program.run({}, {})
    grown = (_status_kib("VmHWM") - before) * 1024
    del out
    return cs.cost.peak_bytes, grown


N = 16 * MiB  # elements: 64 MiB of float32 logical


@pytest.mark.parametrize(
    "case, spec",
    [
        ("H1 topk", topk_spec(N // 4)),
        ("argsort", argsort_spec(N // 4)),
        ("sort", sort_spec(N // 4)),
        ("H2 linear", linear_spec(N)),
        ("H2 linear, expand declared contiguous", linear_spec(N, declared_stride=[64, 1])),
        ("H2 linear, a narrow of an expand declared contiguous", linear_spec(N, declared_stride=[64, 1], narrow=True)),
        ("H2 sdpa", sdpa_spec(N)),
        ("H2 avg_pool2d", avg_pool2d_spec(N)),
    ],
)
def test_the_estimate_bounds_what_the_kernel_takes(case: str, spec: bytes) -> None:
    """The op budget's peak is an upper bound of the memory the run really takes, kernel scratch and dense copies
    of stride-0 arguments included (before: topk 64 MiB, linear / sdpa / avg_pool2d 64 MiB each, estimated at 0-1
    MiB)."""
    estimate, grown = run_growth(spec)
    for _ in range(2):  # the allocator's state left by the worker's earlier tests can serve a run from pages already
        if grown >= 16 * MiB:  # resident (argsort measured 0 growth once in a CI run, session 33; 3 of 3 alone): again
            break
        grown = max(grown, run_growth(spec)[1])
    assert grown >= 16 * MiB, (case, grown / MiB)  # (the measure sees the kernel's allocation)
    assert grown <= estimate + 4 * MiB, (case, grown / MiB, estimate / MiB)


def test_h1_scaled_up_is_refused_before_it_runs() -> None:
    """H1 at break33's size (n = 80M: 1.2 GiB of queue) under a 155 MiB peak limit (the server's at
    ``--memory-mb 1024``): RESOURCE_EXHAUSTED at compile time (before: accepted, estimated peak 0.00 MiB)."""
    with pytest.raises(ResourceExhausted, match="would hold about 1221 MiB"):
        compile_slice(topk_spec(80_000_000), require_hashes=False,
                      op_limits=OpLimits(max_peak_bytes=155 * MiB, device_flops=3.3e11))  # break33's FLOP budget


def test_dense_arguments_cost_no_copy() -> None:
    """The rule fires only for arguments that are not dense: the same ``linear`` on a dense (or transposed, still
    dense) input costs what it did (no scratch)."""
    ops = [_full("x", [4096, 64]), _full("w", [1, 64]), _full("w2", [8, 4096]),
           _op("xt", "aten.t.default", [_t("x")], [_m([64, 4096], stride=[1, 64])]),
           _op("y", "aten.linear.default", [_t("x"), _t("w")], [_m([4096, 1])]),
           _op("z", "aten.linear.default", [_t("xt"), _t("w2")], [_m([64, 8])]),
           _op("s", "aten.softmax.int", [_t("xt"), 1], [_m([64, 4096])])]
    cs = compile_slice(_json(ops, ["y", "z", "s"]), require_hashes=False)
    assert cs.program.nondense == set()
    assert [c.workspace_bytes for c in cs.cost.ops] == [0] * 7
