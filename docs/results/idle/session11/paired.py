"""Per-request pairs of a testbed stream cell's local and coinfer streams (run with COINFER_BENCH_THREAD_CPU=1):
process CPU, latency, the CPU outside the model's ops, garbage collections.

    python docs/results/idle/session11/paired.py RUN_DIR [RUN_DIR ...]
"""
import json
import statistics
import sys
from pathlib import Path


def rows(run: Path) -> dict:
    d = json.loads((run / "logs" / "ue0.json").read_text())
    return {k: v["requests"] for k, v in d["streams"].items() if k in ("local", "coinfer")}


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        s = rows(run)
        loc, co = s["local"], s["coinfer"]
        print(f"\n{run}: {len(loc)} pairs")
        print("| i | local CPU | coinfer CPU | diff | local ms | coinfer ms | local outside ops | coinfer outside ops "
              "| coinfer offline | gc local (n/ms) | gc coinfer (n/ms) | coinfer threads |")
        print("|---" * 12 + "|")
        for a, b in zip(loc, co):
            def out(r):
                return r["cpu_ms"] - r.get("run_whole_cpu_ms", 0.0)

            def gc(r):
                g = r.get("gc", {"n": [0, 0, 0], "ms": [0, 0, 0]})
                return f"{'/'.join(map(str, g['n']))} {sum(g['ms']):.2f}"

            thr = {k: v for k, v in (b.get("thread_cpu_ms") or {}).items() if k != "main"}
            print(f"| {a['i']} | {a['cpu_ms']:.2f} | {b['cpu_ms']:.2f} | {b['cpu_ms'] - a['cpu_ms']:+.2f} | "
                  f"{a['latency_ms']:.1f} | {b['latency_ms']:.1f} | {out(a):.2f} | {out(b):.2f} | {b['offline']} | "
                  f"{gc(a)} | {gc(b)} | {thr} |")
        d = [b["cpu_ms"] - a["cpu_ms"] for a, b in zip(loc, co)]
        dl = [b["latency_ms"] - a["latency_ms"] for a, b in zip(loc, co)]
        do = [(b["cpu_ms"] - b.get("run_whole_cpu_ms", 0)) - (a["cpu_ms"] - a.get("run_whole_cpu_ms", 0))
              for a, b in zip(loc, co)]
        print(f"coinfer - local CPU: mean {statistics.fmean(d):+.2f} median {statistics.median(d):+.2f} ms "
              f"({sum(x > 0 for x in d)} of {len(d)} > 0); latency mean {statistics.fmean(dl):+.1f} median "
              f"{statistics.median(dl):+.1f} ms; outside the ops: mean {statistics.fmean(do):+.2f} median "
              f"{statistics.median(do):+.2f} ms")
        print(f"means: local CPU {statistics.fmean(a['cpu_ms'] for a in loc):.2f} latency "
              f"{statistics.fmean(a['latency_ms'] for a in loc):.1f}; coinfer CPU "
              f"{statistics.fmean(b['cpu_ms'] for b in co):.2f} latency "
              f"{statistics.fmean(b['latency_ms'] for b in co):.1f}")


if __name__ == "__main__":
    main()
