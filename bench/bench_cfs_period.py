"""A UE's request latency under a CPU quota with a long and a short CFS period (same share), side by side.

    python bench/bench_cfs_period.py [--model torchvision:mobilenet_v2] [--cpu 0.1] [--periods-ms 100,10]
                                     [--requests 12] [--json PATH]

Needs writable cgroups (root). One worker process per period, each in its own CPU cgroup
(``testbed.cgroups.CpuCgroup`` with that period), runs the model locally (1 torch thread, eager) on
request; the requests alternate between the workers (one drift of the shared machine for both).
Reports per period: mean, std, min, max and the spread (max - min) of the wall latency, and the CPU
time per request (the quota's efficiency). With a period P a request's latency comes in steps of about
P (the group runs its quota, then waits for the next period), so a long period turns small differences
in CPU time into whole-period differences in latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKER = r"""
import sys, time, torch
torch.set_num_threads(1)
import modelgraph
lm = modelgraph.load_model(sys.argv[1])
m, x = lm.module.eval(), lm.example_inputs
with torch.no_grad():
    m(*x)
    print("ready", flush=True)
    for line in sys.stdin:
        t0, c0 = time.perf_counter(), time.process_time()
        m(*x)
        print(f"{(time.perf_counter() - t0) * 1e3:.3f} {(time.process_time() - c0) * 1e3:.3f}", flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    from testbed.cgroups import CpuCgroup, detect_cgroups

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:mobilenet_v2")
    ap.add_argument("--cpu", type=float, default=0.1, help="CPU share of one core (default 0.1)")
    ap.add_argument("--periods-ms", default="100,10", help="CFS periods to compare (default 100,10)")
    ap.add_argument("--requests", type=int, default=12, help="requests per period (default 12)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    support = detect_cgroups()
    if not support.usable:
        print(f"cgroups unusable: {support.reason}", file=sys.stderr)
        return 2
    periods = [float(p) for p in args.periods_ms.split(",")]
    groups, workers = [], []
    root = Path(__file__).resolve().parents[1]
    try:
        for p in periods:
            cg = CpuCgroup(f"cfr-period-{int(p * 1000)}us", args.cpu, support=support,
                           period_us=round(p * 1000))
            cg.set_cpus(None)  # model loading unthrottled: an offline step
            groups.append(cg)
            w = cg.popen([sys.executable, "-c", WORKER, args.model], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=root)
            workers.append(w)
        for w in workers:
            assert w.stdout.readline().strip() == "ready"
        for cg in groups:
            cg.set_cpus(args.cpu)
        time.sleep(0.5)
        lat: dict[float, list[float]] = {p: [] for p in periods}
        cpu: dict[float, list[float]] = {p: [] for p in periods}
        for k in range(args.requests):
            order = list(zip(periods, workers, strict=True))
            if k % 2:
                order.reverse()
            for p, w in order:
                w.stdin.write("go\n")
                w.stdin.flush()
                wall, c = map(float, w.stdout.readline().split())
                lat[p].append(wall)
                cpu[p].append(c)
        stats = {}
        print(f"{args.model}, {args.cpu * 100:g} % of a core, {args.requests} requests per period, interleaved")
        print("| CFS period ms | mean ms | std ms | min ms | max ms | max - min | CPU ms/request |")
        print("|---|---|---|---|---|---|---|")
        for p in periods:
            xs = lat[p]
            st = {"mean_ms": statistics.mean(xs), "std_ms": statistics.stdev(xs), "min_ms": min(xs), "max_ms": max(xs),
                  "cpu_ms_mean": statistics.mean(cpu[p]), "latencies_ms": xs, "cpu_ms": cpu[p],
                  "throttle": groups[periods.index(p)].throttle_stats()}
            stats[str(p)] = st
            print(f"| {p:g} | {st['mean_ms']:.1f} | {st['std_ms']:.1f} | {st['min_ms']:.1f} | {st['max_ms']:.1f} | "
                  f"{st['max_ms'] - st['min_ms']:.1f} | {st['cpu_ms_mean']:.1f} |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"model": args.model, "cpu": args.cpu, "periods_ms": periods,
                                             "requests": args.requests, "results": stats}, indent=1))
            print(f"wrote {args.json}")
    finally:
        for cg in groups:
            cg.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
