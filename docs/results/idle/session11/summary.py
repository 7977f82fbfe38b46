"""One line per testbed run (logs/ue0.json of a `--policies local,coinfer` stream cell run with
COINFER_BENCH_THREAD_CPU=1): the CPU outside the model's ops (process CPU - run_whole's) of coinfer's
requests 0-1 (the suspension) and 2-11, local's 2-11, the CPU of threads other than the caller during the
requests after the first (both policies, ms per s of the stream), and coinfer - local per request.

    python docs/results/idle/session11/summary.py RUN_DIR [RUN_DIR ...]
"""
import json
import statistics
import sys
from pathlib import Path


def main() -> None:
    print("| run | coinfer req 0 + 1 outside ops, ms | coinfer 2-11, median | local 2-11, median | other threads, "
          "ms/s | coinfer - local CPU, mean / median | latency local / coinfer, mean |")
    print("|---|---|---|---|---|---|---|")
    for run in map(Path, sys.argv[1:]):
        s = json.loads((run / "logs" / "ue0.json").read_text())["streams"]
        loc, co = s["local"]["requests"], s["coinfer"]["requests"]

        def out(r):
            return r["cpu_ms"] - r["run_whole_cpu_ms"]

        rs = sorted([(r["t_wall"], r) for r in loc[1:] + co[1:]], key=lambda x: x[0])
        other = sum(v for _, r in rs for n, v in (r.get("thread_cpu_ms") or {}).items()
                    if n != "main" and v > 0 and "tqdm" not in n)
        span = rs[-1][0] - rs[0][0]
        d = [b["cpu_ms"] - a["cpu_ms"] for a, b in zip(loc, co)]
        print(f"| {run.name} | {out(co[0]):.2f} + {out(co[1]):.2f} = {out(co[0]) + out(co[1]):.2f} | "
              f"{statistics.median(out(r) for r in co[2:]):.2f} | {statistics.median(out(r) for r in loc[2:]):.2f} | "
              f"{other / span:.2f} | {statistics.fmean(d):+.2f} / {statistics.median(d):+.2f} | "
              f"{statistics.fmean(r['latency_ms'] for r in loc):.1f} / "
              f"{statistics.fmean(r['latency_ms'] for r in co):.1f} |")


if __name__ == "__main__":
    main()
