"""Benchmark of the model-graph layer: capture time, slice codec throughput, offloadable fraction.

    .venv/bin/python bench/bench_modelgraph.py --out results/bench_modelgraph
    .venv/bin/python bench/bench_modelgraph.py --quick   # resnet18 + synthetic only, fewer repeats

Prints tables and writes ``bench_modelgraph.json`` under ``--out``. Sections:
  capture    torch.export + conversion time per model, op count, weight MiB, fraction of ops (and of
             op time-independent weight bytes) on the server allowlist
  codec      encode_slice / decode_slice (with and without sha256) of the full server part, MB/s
             (MB = 1e6 bytes of weights), plus the cost of each step so a shortfall can be located:
             raw sha256, one memcpy of the weight bytes, header JSON
  profiler   hook: if ``profiler.profile_model`` is importable, time it for resnet50 and print the
             per-op-sum vs whole-graph error; else "profiler not available"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modelgraph import SliceProgram, capture, decode_slice, encode_slice, load_model, make_slice  # noqa: E402
from modelgraph.allowlist import is_allowed  # noqa: E402
from modelgraph.tensors import tensor_bytes  # noqa: E402
from modelgraph.zoo import SYNTHETIC, TRANSFORMERS  # noqa: E402

TORCHVISION = ["resnet18", "mobilenet_v2", "googlenet", "densenet121", "resnet50"]
CODEC_MODELS = ["resnet50", "resnet18"]


def _timeit(fn, repeat: int) -> tuple[float, object]:
    """Median wall seconds of ``repeat`` calls (after one warm-up call) and the last result."""
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ---- capture ------------------------------------------------------------------------------------
def bench_capture(specs: list[str]) -> tuple[list[dict], dict]:
    rows, graphs = [], {}
    for spec in specs:
        lm = load_model(spec)
        t0 = time.perf_counter()
        g = capture(lm.module, lm.example_inputs, name=spec)
        dt = time.perf_counter() - t0
        graphs[spec] = (lm, g)
        allowed = [op for op in g.ops if is_allowed(op.target)]
        off_targets = sorted({op.target for op in g.ops if not is_allowed(op.target)})
        rows.append({
            "model": spec, "capture_s": dt, "ops": len(g.ops), "distinct_ops": len({op.target for op in g.ops}),
            "weights": len(g.weights), "weight_mib": g.total_weight_bytes / 2**20,
            "offloadable_ops": len(allowed), "offloadable_frac": len(allowed) / max(len(g.ops), 1),
            "not_allowlisted": off_targets, "model_hash": g.model_hash,
        })
    return rows, graphs


# ---- codec --------------------------------------------------------------------------------------
def bench_codec(spec: str, lm, g, repeat: int) -> dict:
    sp = g.split_at(0)
    t0 = time.perf_counter()
    sl = make_slice(g, sp)  # computes every weight's sha256 once (cached on the graph)
    make_first_s = time.perf_counter() - t0
    make_s, sl = _timeit(lambda: make_slice(g, sp), repeat)
    nbytes = sl.weight_bytes
    mb = nbytes / 1e6

    enc_s, blob = _timeit(lambda: encode_slice(sl, g.weight_values), repeat)
    dec_s, _ = _timeit(lambda: decode_slice(blob, verify=True), repeat)
    dec_nv_s, _ = _timeit(lambda: decode_slice(blob, verify=False), repeat)

    # where the time goes: the unavoidable parts, measured on the same bytes
    bufs = [tensor_bytes(g.weight_values[n]) for n in sl.weights]
    sha_s, _ = _timeit(lambda: [hashlib.sha256(b).digest() for b in bufs], repeat)
    # hashlib releases the GIL on large buffers: the proposed fix for a sha256-bound decode
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        sha_par_s, _ = _timeit(lambda: list(pool.map(lambda b: hashlib.sha256(b).digest(), bufs)), repeat)
    copy_s, _ = _timeit(lambda: b"".join(bufs), repeat)
    header_s, _ = _timeit(lambda: sl.to_json().encode(), repeat)
    parse_s, _ = _timeit(lambda: json.loads(sl.to_json()), repeat)
    validate_s, _ = _timeit(lambda: SliceProgram(decode_slice(blob, verify=False)[0]), max(1, repeat // 2))

    def rate(s: float) -> float:
        return mb / s if s > 0 else float("inf")

    return {
        "model": spec, "weight_bytes": nbytes, "blob_bytes": len(blob), "header_bytes": len(sl.to_json()),
        "weights": len(sl.weights), "ops": len(sl.ops),
        "make_slice_first_s": make_first_s, "make_slice_s": make_s,
        "encode_s": enc_s, "encode_mb_s": rate(enc_s),
        "decode_verify_s": dec_s, "decode_verify_mb_s": rate(dec_s),
        "decode_noverify_s": dec_nv_s, "decode_noverify_mb_s": rate(dec_nv_s),
        "sha256_only_mb_s": rate(sha_s), "sha256_threads_mb_s": rate(sha_par_s), "memcpy_only_mb_s": rate(copy_s),
        "header_json_s": header_s, "header_parse_s": parse_s, "validate_s": validate_s,
        "copies_encode": 1, "copies_decode": 0,
    }


# ---- profiler hook ------------------------------------------------------------------------------
def bench_profiler(graphs: dict, spec: str = "torchvision:resnet50") -> dict:
    """Hook for the profiler section (profiler/ is written separately): used only if importable."""
    try:
        from profiler import profile_model
    except ImportError as e:
        print(f"\nprofiler not available ({e})")
        return {"available": False}
    if spec not in graphs:
        lm = load_model(spec)
        graphs[spec] = (lm, capture(lm.module, lm.example_inputs, name=spec))
    lm, g = graphs[spec]
    t0 = time.perf_counter()
    prof = profile_model(g, lm.example_inputs, use_cache=False)  # defaults otherwise; no cache: time it really
    dt = time.perf_counter() - t0
    whole, per_op = prof.whole_model_ms, prof.sum_mean_ms
    err = (per_op - whole) / whole if whole else float("nan")
    raw_err = (prof.raw_sum_mean_ms - whole) / whole if whole else float("nan")
    row = {"available": True, "model": spec, "profile_s": dt, "runs": prof.runs, "warmup": prof.warmup,
           "threads": prof.threads, "whole_model_ms": whole, "per_op_sum_ms": per_op,
           "raw_per_op_sum_ms": prof.raw_sum_mean_ms, "calibration": prof.calibration, "rel_error": err,
           "raw_rel_error": raw_err}
    print(f"\nprofiler: profile_model({spec}) took {dt:.1f} s (runs={prof.runs}, warmup={prof.warmup}, "
          f"threads={prof.threads})")
    print(f"  whole graph {whole:.2f} ms, per-op sum {per_op:.2f} ms (raw {prof.raw_sum_mean_ms:.2f} ms, "
          f"calibration {prof.calibration:.3f}): error {err * 100:+.1f} % calibrated, {raw_err * 100:+.1f} % raw")
    return row


# ---- output -------------------------------------------------------------------------------------
def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = [c[1] for c in cols]
    body = [[format(r[c[0]], c[2]) if c[2] else str(r[c[0]]) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(b, widths))) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/bench_modelgraph"), help="directory for the JSON")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats per codec measurement (median)")
    ap.add_argument("--quick", action="store_true", help="resnet18 + synthetic models only, 3 repeats")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-profiler", action="store_true", help="skip the profiler section")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tv = ["resnet18"] if args.quick else TORCHVISION
    codec_models = ["resnet18"] if args.quick else CODEC_MODELS
    repeat = 3 if args.quick else args.repeat
    specs = [f"torchvision:{n}" for n in tv] + [f"modelgraph.zoo:{n}" for n in TRANSFORMERS + SYNTHETIC]

    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print(f"bench_modelgraph: torch {env['torch']}, {env['cpus']} CPUs, {env['torch_threads']} torch threads")

    cap_rows, graphs = bench_capture(specs)
    print("\ncapture (torch.export + conversion; fraction of ops on the server allowlist)")
    print(_table(cap_rows, [("model", "model", ""), ("capture_s", "capture s", ".2f"), ("ops", "ops", "d"),
                            ("distinct_ops", "distinct", "d"), ("weight_mib", "weights MiB", ".1f"),
                            ("offloadable_frac", "offloadable", ".0%")]))
    for r in cap_rows:
        if r["not_allowlisted"]:
            print(f"  {r['model']}: not on the allowlist: {', '.join(r['not_allowlisted'])}")

    codec_rows = [bench_codec(f"torchvision:{n}", *graphs[f"torchvision:{n}"], repeat) for n in codec_models]
    print("\nslice codec, full server part (MB/s of weight bytes; encode makes 1 copy, decode 0)")
    print(_table(codec_rows, [("model", "model", ""), ("weight_bytes", "bytes", ",d"),
                              ("encode_mb_s", "encode", ".0f"), ("decode_verify_mb_s", "decode+sha", ".0f"),
                              ("decode_noverify_mb_s", "decode", ".0f"), ("sha256_only_mb_s", "sha256 alone", ".0f"),
                              ("sha256_threads_mb_s", "sha256 threads", ".0f"),
                              ("memcpy_only_mb_s", "memcpy alone", ".0f"), ("validate_s", "validate s", ".3f"),
                              ("make_slice_first_s", "make_slice 1st s", ".3f")]))

    prof_row = {"available": False, "skipped": True} if args.no_profiler else bench_profiler(graphs)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_modelgraph.json"
    path.write_text(json.dumps({"env": env, "capture": cap_rows, "codec": codec_rows, "profiler": prof_row},
                               indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
