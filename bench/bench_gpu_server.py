"""A CUDA edge server beside a CPU one, in one run: server compute per warm request, end-to-end latency on loopback,
and how far the answers are from the UE's own eager ``model(*inputs)``, with TF32 off (the server's default) and on.

    python bench/bench_gpu_server.py [--models resnet18,mobilenet_v2,googlenet] [--requests 10] [--json PATH]

Each (model, server) pair: a real ``coinfer-edge serve`` process (``--device cpu --threads T``, ``--device cuda``,
``--device cuda --tf32``) on a free loopback port, one client offloading the whole model (``server_ops=0``: the server
part is every op, the UE sends the input), one cold request, then ``--requests`` warm ones. Reported: the medians of
the warm requests' server compute (``server_timings.compute_ms``, the server's own clock, CUDA synchronised) and the
UE's measured latency, and the largest |server answer - eager| over all requests. Needs CUDA for the cuda rows (they
are skipped without it). Prints a table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from modelgraph.tv_compat import import_torchvision  # noqa: E402
from testbed.launcher import edge_server_process  # noqa: E402
from ue_client import CoinferClient, new_tenant  # noqa: E402


def _leaves(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _leaves(v)]
    if isinstance(x, tuple | list):
        return [t for v in x for t in _leaves(v)]
    return []


def _diff(a, b) -> float:
    return max((float((p.double() - q.double()).abs().max()) for p, q in zip(_leaves(a), _leaves(b))), default=0.0)


def run_one(model_name: str, server_args: list[str], requests: int, threads: int) -> dict:
    tv = import_torchvision()
    torch.manual_seed(0)
    module = tv.models.get_model(model_name, weights=None, num_classes=1000).eval()
    if model_name == "googlenet":
        module = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    x = (torch.randn(1, 3, 224, 224),)
    with torch.no_grad():
        want = module(*x)
    with edge_server_process(threads, extra_args=server_args) as (_proc, port):
        c = CoinferClient(module, x, server=f"127.0.0.1:{port}", tenant=new_tenant(), server_ops=0)
        try:
            compute, measured, diffs = [], [], []
            t0 = time.perf_counter()
            got = c(*x)
            cold_ms = (time.perf_counter() - t0) * 1e3
            diffs.append(_diff(got, want))
            for _ in range(requests):
                got = c(*x)
                rep = c.last_report
                assert not rep.fallback, rep.fallback_reason
                compute.append((rep.server_timings or {}).get("compute_ms", float("nan")))
                measured.append(rep.measured_ms)
                diffs.append(_diff(got, want))
            return {"model": model_name, "server": " ".join(server_args), "requests": requests,
                    "cold_ms": round(cold_ms, 1),
                    "server_compute_ms_median": round(statistics.median(compute), 3),
                    "server_compute_ms_min": round(min(compute), 3),
                    "measured_ms_median": round(statistics.median(measured), 2),
                    "max_abs_diff_vs_eager": max(diffs),
                    "ref_max_abs": float(max(t.abs().max() for t in _leaves(want)))}
        finally:
            c.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,googlenet")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--threads", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                    help="the CPU server's --threads (default: cores - 1, at most 8)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.requests < 1 or args.threads < 1:
        ap.error("--requests and --threads must be >= 1")
    servers = [["--device", "cpu"]]
    if torch.cuda.is_available():
        servers += [["--device", "cuda"], ["--device", "cuda", "--tf32"]]
    rows = []
    for m in [s.strip() for s in args.models.split(",") if s.strip()]:
        for s in servers:
            r = run_one(m, s, args.requests, args.threads)
            rows.append(r)
            print(json.dumps(r), flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"\nGPU: {gpu}; torch {torch.__version__}; CPU server --threads {args.threads}; "
          f"{args.requests} warm requests each, whole model on the server (server_ops=0)\n")
    print("| model | server | cold ms | warm server compute ms (median / min) | warm measured ms (median) "
          "| max abs diff vs eager (ref max) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['server']} | {r['cold_ms']} | {r['server_compute_ms_median']} / "
              f"{r['server_compute_ms_min']} | {r['measured_ms_median']} | {r['max_abs_diff_vs_eager']:.2e} "
              f"({r['ref_max_abs']:.2e}) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "cpu_threads": args.threads,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
