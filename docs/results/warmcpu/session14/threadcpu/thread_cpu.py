"""Per-thread UE CPU of warm requests, per policy, from a bench run made with COINFER_BENCH_THREAD_CPU=1.

    python docs/results/warmcpu/session14/threadcpu/thread_cpu.py [LOGS_DIR]

Prints, per cell and policy, the warm requests' (1..K-1) medians of latency, UE process CPU, plan_ms,
plan_cpu_ms and the server's compute, then each UE thread's CPU ms per request (median; threads that did not
run in a request count 0)."""

from __future__ import annotations

import collections
import glob
import json
import os
import statistics as st
import sys


def main(logs: str) -> None:
    for f in sorted(glob.glob(os.path.join(logs, "ue*.json"))):
        if f.endswith(".spec.json"):
            continue
        with open(f) as fh:
            d = json.load(fh)
        if "streams" not in d:
            continue
        print(os.path.basename(f), d["spec"]["model"], d["spec"]["cpu"], d["spec"]["uplink_mbps"])
        for pol, s in d["streams"].items():
            rq = s["requests"][1:]

            def med(k: str, rq: list = rq) -> float:
                return round(st.median(r[k] for r in rq if isinstance(r.get(k), (int, float))), 2)

            comp = [r["server_timings"]["compute_ms"] for r in rq if r.get("server_timings")]
            print(f"  {pol:20s} latency {med('latency_ms'):7.1f}  cpu {med('cpu_ms'):5.2f}  plan {med('plan_ms'):5.2f}"
                  f"  plan_cpu {med('plan_cpu_ms'):5.2f}  server compute "
                  f"{round(st.median(comp), 1) if comp else '-'}")
            th = collections.defaultdict(list)
            for r in rq:
                for k, v in (r.get("thread_cpu_ms") or {}).items():
                    th[k].append(v)
            for k, v in sorted(th.items(), key=lambda kv: -sum(kv[1])):
                print(f"      {k:24s} {st.median(v + [0.0] * (len(rq) - len(v))):5.2f} ms (in {len(v)} of {len(rq)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "logs"))
