"""Session 34 (break42 F1's left-over): what a batched matrix product costs against what the op budget prices it.

For each case the script builds the slice an attacker (or a model) sends, as JSON (factories + ``expand`` for
broadcast operands, declared inputs for dense ones), compiles it as the server does (``compile_slice``: meta
propagation, ``estimate_slice``), reads the matrix product's price (``op_budget.priced_seconds`` under limits measured
here: ``measure_device_flops`` at the thread count in force, ``measure_slow_gemm_rates``) and times the same op on real
tensors of the same layout (best of 3 after a warm-up: the thread's CPU time at one intra-op thread, else the wall
clock). "old" is the price before session 34 (the product's
FLOPs at the GEMM rate: the cost's non-serial part), "new" the price now; ratio = measured / new (<= 1: priced at or
above its time).

Groups: a float32 grid (m, n in 1..197, k in 1..4096, broadcast and dense operands), a sweep over small k, transposed
operands, baddbmm / broadcast matmul / mm, break42's attacker shapes at 1 and 2 intra-op threads, bfloat16 / float16 /
float64, scaled_dot_product_attention, and the zoo (every model's whole slice compiled under the server's limits:
admitted or not, its dearest op; each matrix-product / attention op timed).

Usage: flock /work/wt/.bench.lock .venv/bin/python docs/results/attack/session34/bmm_cost_sweep.py [--quick] [--no-zoo]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../.."))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edge_server.op_budget import (  # noqa: E402
    OpLimits,
    measure_device_flops,
    measure_slow_gemm_rates,
    priced_seconds,
)
from edge_server.slices import compile_slice  # noqa: E402

DT = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
WORST: dict[str, float] = {}


def meta(shape, dtype="float32"):
    return {"shape": list(shape), "dtype": dtype}


def zeros(name, shape, dtype):
    return {
        "name": name,
        "target": "aten.zeros.default",
        "args": [list(shape)],
        "kwargs": {"dtype": {"dtype": dtype}, "device": {"device": None}, "pin_memory": False},
        "outputs": [meta(shape, dtype)],
    }


def op(name, target, args, outs):
    return {"name": name, "target": target, "args": args, "kwargs": {}, "outputs": outs}


def operand(name, shape, layout, dtype, ops, inputs):
    """Ops / inputs making tensor ``name`` of ``shape`` (3-D) laid out as ``layout``; returns a maker of the real
    one."""
    b, r, c = shape
    if layout == "bc":
        ops += [
            zeros(name + "0", [1, r, c], dtype),
            op(name, "aten.expand.default", [{"t": name + "0"}, [b, r, c]], [meta(shape, dtype)]),
        ]
        return lambda: torch.randn(1, r, c).to(DT[dtype]).expand(b, r, c)
    if layout == "T":
        inputs[name + "0"] = meta([b, c, r], dtype)
        ops.append(op(name, "aten.transpose.int", [{"t": name + "0"}, 1, 2], [meta(shape, dtype)]))
        return lambda: torch.randn(b, c, r).to(DT[dtype]).transpose(1, 2)
    inputs[name] = meta(shape, dtype)
    return lambda: torch.randn(b, r, c).to(DT[dtype])


def product_case(kind, B, m, k, n, la="bc", lb="bc", dtype="float32"):
    """(slice JSON, target, function running the op on real tensors) for one product."""
    ops, inputs = [], {}
    if kind == "mm":
        ops += [zeros("a", [m, k], dtype), zeros("b", [k, n], dtype)]
        target, out = "aten.mm.default", [m, n]

        def run():
            a, b = torch.randn(m, k).to(DT[dtype]), torch.randn(k, n).to(DT[dtype])
            return lambda: torch.mm(a, b)
    elif kind == "matmul":  # [1, m, k] @ [B, k, n]: the batch broadcast inside matmul
        inputs["a"] = meta([1, m, k], dtype)
        mk_b = operand("b", [B, k, n], lb, dtype, ops, inputs)
        target, out = "aten.matmul.default", [B, m, n]

        def run():
            a, b = torch.randn(1, m, k).to(DT[dtype]), mk_b()
            return lambda: torch.matmul(a, b)
    else:
        mk_a = operand("a", [B, m, k], la, dtype, ops, inputs)
        mk_b = operand("b", [B, k, n], lb, dtype, ops, inputs)
        if kind == "baddbmm":
            mk_c = operand("c", [B, m, n], la, dtype, ops, inputs)
            target = "aten.baddbmm.default"

            def run():
                a, b, c = mk_a(), mk_b(), mk_c()
                return lambda: torch.baddbmm(c, a, b)
        else:
            target = "aten.bmm.default"

            def run():
                a, b = mk_a(), mk_b()
                return lambda: torch.bmm(a, b)

        out = [B, m, n]
    args = [{"t": "c"}, {"t": "a"}, {"t": "b"}] if kind == "baddbmm" else [{"t": "a"}, {"t": "b"}]
    ops.append(op("y", target, args, [meta(out, dtype)]))
    spec = {"version": 1, "ops": ops, "inputs": inputs or {"x": meta([1])}, "outputs": ["y"], "weights": {}}
    return json.dumps(spec).encode(), target, run


def sdpa_case(N, L, S, E, layout="dense", dtype="float32", mode="4d"):
    """scaled_dot_product_attention of N heads: ``mode`` 4d ([1, N, L, E]: the flash kernel), 3d ([N, L, E]: the
    math path), 4d_qT (q's last dim transposed: math), 4d_dropout (dropout_p 0.1: math), 4d_mask (a float mask
    [L, S])."""
    ops, inputs, makers = [], {}, []
    lead = [1, N] if mode.startswith("4d") else [N]
    for nm, rows in (("q", L), ("k", S), ("v", S)):
        shape = [*lead, rows, E]
        if layout == "bc":
            ops += [
                zeros(nm + "0", [*([1] * len(lead)), rows, E], dtype),
                op(nm, "aten.expand.default", [{"t": nm + "0"}, shape], [meta(shape, dtype)]),
            ]
            makers.append(
                lambda shape=shape, rows=rows: torch.randn(*([1] * len(lead)), rows, E).to(DT[dtype]).expand(*shape)
            )
        elif nm == "q" and mode == "4d_qT":
            inputs["q0"] = meta([*lead, E, rows], dtype)
            ops.append(op("q", "aten.transpose.int", [{"t": "q0"}, -1, -2], [meta(shape, dtype)]))
            makers.append(lambda rows=rows: torch.randn(*lead, E, rows).to(DT[dtype]).transpose(-1, -2))
        else:
            inputs[nm] = meta(shape, dtype)
            makers.append(lambda shape=shape: torch.randn(*shape).to(DT[dtype]))
    args = [{"t": "q"}, {"t": "k"}, {"t": "v"}]
    kw = {}
    if mode == "4d_mask":
        inputs["m"] = meta([L, S], dtype)
        args += [{"t": "m"}]
        makers.append(lambda: torch.zeros(L, S).to(DT[dtype]))
    if mode == "4d_dropout":
        args += [None, 0.1]
        kw["dropout_p"] = 0.1
    target = "aten.scaled_dot_product_attention.default"
    ops.append(op("y", target, args, [meta([*lead, L, E], dtype)]))
    spec = {"version": 1, "ops": ops, "inputs": inputs or {"x": meta([1])}, "outputs": ["y"], "weights": {}}

    def run():
        ts = [mk() for mk in makers]
        if mode == "4d_mask":
            return lambda: F.scaled_dot_product_attention(*ts[:3], attn_mask=ts[3])
        return lambda: F.scaled_dot_product_attention(*ts, **kw)

    return json.dumps(spec).encode(), target, run


def best_of(fn, reps=3) -> float:
    """Best of ``reps`` after a warm-up: at one intra-op thread this thread's CPU time (``time.thread_time``, as
    ``measure_device_flops`` reads the rate: time the OS gives other processes on this shared machine does not
    count), else the wall clock."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    t = math.inf
    for _ in range(reps):
        t0 = clock()
        fn()
        t = min(t, clock() - t0)
    return t


def prices(spec: bytes, target: str, dtype: str, limits: OpLimits) -> tuple[float, float]:
    """(old, new) seconds of the op named "y"."""
    cs = compile_slice(spec, require_hashes=False, op_limits=limits, max_tensor_bytes=1 << 40, max_slice_bytes=1 << 42)
    (cost,) = [c for o, c in zip(cs.program.order, cs.cost.ops) if o.name == "y"]
    new = priced_seconds(target, dtype, cost, limits)
    slow = {r[0]: r[1] for r in limits.slow_gemm_rates}
    old = (
        (cost.flops - cost.serial_flops)
        * (max(limits.device_flops / slow[dtype], 1.0) if dtype in slow else 1.0)
        / limits.device_flops
    )
    return old, new


def row(group: str, label: str, spec, target, run, dtype, limits, reps=3) -> None:
    old, new = prices(spec, target, dtype, limits)
    with torch.inference_mode():
        meas = best_of(run(), reps)
    ratio = meas / new
    WORST[group] = max(WORST.get(group, 0.0), ratio)
    print(
        f"{group:9s} {label:44s} measured {meas * 1e3:9.3f} ms  old {old * 1e3:9.3f} ms  new {new * 1e3:9.3f} ms"
        f"  measured/old {meas / old:7.1f}  measured/new {ratio:5.2f}",
        flush=True,
    )


def size_b(m, k, n, target_s=0.03, cap=2.5e7, dense=True) -> int:
    est_ns = 100 + 3.0 * m * k * n / (min(m, 8) * min(n, 32)) + 3.5 * m * n + 0.8 * (m * k + k * n)
    b = int(target_s * 1e9 / est_ns)
    return max(1, min(b, int(cap / (m * k + k * n + m * n)) if dense else int(cap / (m * n))))


def limits_now() -> OpLimits:
    return OpLimits(
        max_workspace_bytes=1 << 60,
        max_op_ms=1e12,
        device_flops=measure_device_flops(torch.device("cpu")),
        slow_gemm_rates=measure_slow_gemm_rates(torch.device("cpu")),
        threads=torch.get_num_threads(),
    )


def zoo(limits_1t: OpLimits) -> None:
    """Every zoo model's whole slice under the server's limits (2000 ms per op, this machine's 1-thread rate); each
    matrix-product / attention op's price against its time in the model's own run (``profiler.profile_graph``, one
    thread, raw per-op means of 10 runs in CPU time)."""
    from modelgraph.capture import capture
    from modelgraph.slice import make_slice
    from modelgraph.sources import load_model
    from modelgraph.zoo import ZOO
    from profiler import profile_graph

    server = OpLimits(
        max_op_ms=2000.0, device_flops=limits_1t.device_flops, slow_gemm_rates=limits_1t.slow_gemm_rates, threads=1
    )
    models = [(n, lambda n=n: ZOO[n]()) for n in ("tiny_vit", "vit_small")]
    for name in ("resnet18", "mobilenet_v2", "googlenet", "resnet50", "vit_b_16"):
        models.append(
            (name, lambda name=name: (lambda lm: (lm.module, lm.example_inputs))(load_model(f"torchvision:{name}")))
        )
    products = ("bmm", "matmul", "baddbmm", "mm", "addmm", "linear", "scaled_dot_product_attention")
    for name, make in models:
        module, inputs = make()
        g = capture(module, inputs)
        spec = make_slice(g, g.split(frozenset(o.name for o in g.ops)), with_hashes=False)
        try:
            cs = compile_slice(spec.to_json(), require_hashes=False, op_limits=server)
        except Exception as e:  # the verdict is the output
            print(f"zoo       {name:14s} REFUSED: {e}", flush=True)
            WORST["zoo refused"] = WORST.get("zoo refused", 0) + 1
            continue
        priced = {
            o.name: (o, c, priced_seconds(o.target, o.outputs[0].dtype, c, server))
            for o, c in zip(cs.program.order, cs.cost.ops)
            if o.outputs
        }
        old_sum = sum((c.flops - c.serial_flops) / server.device_flops for _, c, _ in priced.values())
        dear = max(priced.values(), key=lambda t: t[2])
        prof = profile_graph(g, inputs, threads=1, runs=10, warmup=2, calibrate=False, clock=time.thread_time)
        meas = {s.name: s.raw_mean_ms / 1e3 for s in prof.ops}
        print(
            f"zoo       {name:14s} admitted under 2000 ms per op (1 thread); {len(priced)} ops priced "
            f"{sum(t for _, _, t in priced.values()) * 1e3:.1f} ms in all (old {old_sum * 1e3:.1f}), dearest "
            f"{dear[0].target} {dear[2] * 1e3:.2f} ms; measured op-by-op {sum(meas.values()) * 1e3:.1f} ms",
            flush=True,
        )
        for n_, (o, c, new) in priced.items():
            short = o.target.split(".")[1]
            if short not in products or n_ not in meas:
                continue
            old = (c.flops - c.serial_flops) / server.device_flops
            m = meas[n_]
            WORST["zoo ops"] = max(WORST.get("zoo ops", 0.0), m / new)
            print(
                f"zoo op    {name:14s} {n_[:34]:34s} {short:12s} out {list(o.outputs[0].shape)!s:18s} measured "
                f"{m * 1e3:8.3f} ms  old {old * 1e3:8.3f} ms  new {new * 1e3:8.3f} ms  new/measured {new / m:5.2f}",
                flush=True,
            )
    print("worst measured/new: " + ", ".join(f"{g} {r:.2f}" for g, r in WORST.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few shapes per group")
    ap.add_argument("--no-zoo", action="store_true")
    ap.add_argument("--groups", default="grid,small-k,transpose,products,attack,dtypes,sdpa", help="which to run")
    a = ap.parse_args()
    groups = set(a.groups.split(","))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    lim = limits_now()
    print(
        f"torch {torch.__version__}, 1 intra-op thread: device_flops {lim.device_flops / 1e9:.1f} GFLOP/s, slow "
        f"dtypes {[r[0] for r in lim.slow_gemm_rates]}",
        flush=True,
    )
    dims = (1, 3, 8, 16, 32, 64, 197)
    ks = (1, 8, 64, 512, 4096)
    if a.quick:
        dims, ks = (1, 16, 197), (1, 64, 4096)
    # 1. float32 grid, broadcast and dense operands
    if "grid" in groups:
        for m, n, k in itertools.product(dims, dims, ks):
            for lay in ("bc", "dense"):
                B = size_b(m, k, n, dense=lay == "dense")
                row(
                    "grid",
                    f"bmm {lay:5s} B={B} {m}x{k}x{n}",
                    *product_case("bmm", B, m, k, n, lay, lay),
                    "float32",
                    lim,
                )
    # 2. small k
    if "small-k" in groups:
        for (m, n), k in itertools.product(
            ((1, 1), (1, 64), (64, 1), (8, 8), (16, 16), (64, 64), (197, 197), (3, 197)),
            (2, 4, 12, 16, 24, 32, 48, 96, 128) if not a.quick else (16, 24),
        ):
            for lay in ("bc", "dense"):
                B = size_b(m, k, n, dense=lay == "dense")
                row(
                    "small-k",
                    f"bmm {lay:5s} B={B} {m}x{k}x{n}",
                    *product_case("bmm", B, m, k, n, lay, lay),
                    "float32",
                    lim,
                )
    # 3. transposed operands
    if "transpose" in groups:
        for m, k, n in (
            (1, 4096, 1),
            (1, 64, 1),
            (64, 64, 1),
            (1, 64, 64),
            (16, 1, 16),
            (64, 1, 64),
            (3, 512, 3),
            (8, 8, 8),
            (197, 64, 197),
            (197, 197, 64),
        ):
            B = size_b(m, k, n)
            for la, lb in (("T", "dense"), ("dense", "T"), ("T", "T")):
                row(
                    "transpose",
                    f"bmm a={la} b={lb} B={B} {m}x{k}x{n}",
                    *product_case("bmm", B, m, k, n, la, lb),
                    "float32",
                    lim,
                )
    # 4. the other products
    if "products" in groups:
        for m, k, n in ((1, 64, 1), (1, 4096, 1), (16, 1, 16), (64, 8, 64), (8, 8, 8), (197, 64, 197)):
            for lay in ("bc", "dense"):
                B = size_b(m, k, n, dense=lay == "dense")
                row(
                    "baddbmm",
                    f"baddbmm {lay:5s} B={B} {m}x{k}x{n}",
                    *product_case("baddbmm", B, m, k, n, lay, lay),
                    "float32",
                    lim,
                )
                row(
                    "matmul",
                    f"matmul [1,m,k]@b {lay:5s} B={B} {m}x{k}x{n}",
                    *product_case("matmul", B, m, k, n, lay, lay),
                    "float32",
                    lim,
                )
        for m, k, n in (
            (1, 1 << 22, 1),
            (1, 1 << 16, 1),
            (4096, 1, 4096),
            (1, 4096, 4096),
            (4096, 4096, 1),
            (256, 256, 256),
            (1024, 1024, 1024),
        ):
            row("mm", f"mm {m}x{k}x{n}", *product_case("mm", 1, m, k, n), "float32", lim)
    # 5. break42's attacker shapes (broadcast views of a few hundred bytes), at 1 and 2 threads
    if "attack" in groups:
        attack = [
            ("bmm", 3_000_000, 1, 64, 1),
            ("bmm", 65_536, 1, 4096, 1),
            ("bmm", 30_000_000, 1, 8, 1),
            ("bmm", 262_144, 1, 1024, 1),
            ("bmm", 250_000, 16, 1, 16),
            ("bmm", 32_768, 64, 1, 64),
            ("baddbmm", 3_000_000, 1, 64, 1),
            ("matmul", 3_000_000, 1, 64, 1),
            ("matmul", 65_536, 1, 4096, 1),
        ]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            lt = limits_now()
            print(f"-- {threads} intra-op threads: device_flops {lt.device_flops / 1e9:.1f} GFLOP/s", flush=True)
            for kind, B, m, k, n in attack[:3] if a.quick else attack:
                row(f"attack{threads}t", f"{kind} bc B={B} {m}x{k}x{n}", *product_case(kind, B, m, k, n), "float32", lt)
            for kind, B, m, k, n in (
                ("bmm", 24, 197, 64, 197),
                ("bmm", 24, 197, 197, 64),
                ("bmm", 48, 512, 64, 512),
                ("bmm", 48, 512, 512, 64),
            ):
                row(
                    f"attn{threads}t",
                    f"{kind} dense B={B} {m}x{k}x{n}",
                    *product_case(kind, B, m, k, n, "dense", "dense"),
                    "float32",
                    lt,
                )
        torch.set_num_threads(1)
    # 6. other dtypes (briefly)
    if "dtypes" in groups:
        for dtype in ("float64", "bfloat16", "float16"):
            for m, k, n in (
                (1, 8, 1),
                (1, 64, 1),
                (1, 4096, 1),
                (16, 1, 16),
                (64, 1, 64),
                (64, 64, 1),
                (1, 64, 64),
                (8, 8, 8),
                (64, 8, 64),
                (3, 512, 3),
                (197, 64, 197),
                (197, 197, 64),
                (64, 64, 64),
            ):
                for lay in ("bc", "dense"):
                    B = size_b(m, k, n, dense=lay == "dense")
                    if dtype == "float16":
                        B = max(1, B // 20)
                    row(
                        dtype,
                        f"bmm {lay:5s} B={B} {m}x{k}x{n}",
                        *product_case("bmm", B, m, k, n, lay, lay, dtype),
                        dtype,
                        lim,
                    )
            row(
                dtype,
                "bmm bc B=1000000 1x64x1 (attack)",
                *product_case("bmm", 1_000_000, 1, 64, 1, dtype=dtype),
                dtype,
                lim,
            )
    # 7. scaled_dot_product_attention: tiny heads to vit_b_16's and BERT-base's, the flash kernel and the math path
    if "sdpa" in groups:
        sd = [
            (1_000_000, 1, 1, 1),
            (200_000, 1, 1, 64),
            (200_000, 4, 4, 4),
            (100_000, 1, 64, 1),
            (100_000, 8, 8, 8),
            (50_000, 16, 16, 16),
            (20_000, 1, 256, 1),
            (2_000, 1, 64, 64),
            (12, 197, 197, 64),
            (48, 512, 512, 64),
            (12, 50, 50, 64),
            (4_000, 32, 32, 32),
            (2, 2048, 2048, 64),
        ]
        for (N, L, S, E), mode in itertools.product(
            sd[::4] if a.quick else sd, ("4d", "3d", "4d_qT", "4d_dropout", "4d_mask")
        ):
            for lay in ("bc", "dense") if mode in ("4d", "3d") else ("dense",):
                row(
                    "sdpa",
                    f"sdpa {mode:10s} {lay:5s} N={N} L={L} S={S} E={E}",
                    *sdpa_case(N, L, S, E, lay, mode=mode),
                    "float32",
                    lim,
                )
    print("worst measured/new per group: " + ", ".join(f"{g} {r:.2f}" for g, r in WORST.items()), flush=True)
    if not a.no_zoo:
        zoo(lim)


if __name__ == "__main__":
    main()
