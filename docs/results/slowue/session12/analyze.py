"""Summarise the slowue runs (run_one.sh): per run, the resnet50 10 %/400 cell's UE CPU per request (local and
coinfer; inside the model's ops and outside; by thread), gaps between requests, client constructions, the cell's
wall; multi-UE N = 1's walls (serving only / with start-up) and throughput. Usage: analyze.py RUN_DIR... > table;
writes summary.json beside this script."""

from __future__ import annotations

import itertools
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 1) if xs else None


def cell(run: Path) -> dict:
    ue = json.loads((run / "cell" / "logs" / "ue0.json").read_text())
    con = (run / "cell.console").read_text()
    m = re.search(r"stream resnet50 .*\((\d+) s\)", con)
    done = re.search(r"bench done in (\d+) s", con)
    out = {"cell_s": int(m.group(1)) if m else None, "bench_s": int(done.group(1)) if done else None,
           "capture_s": round(ue.get("capture_s", 0), 1), "connect_s": round(ue.get("connect_s", 0), 1),
           "paired_wall_s": round(ue["streams"]["local"].get("wall_s", 0), 2)}
    reqs = []
    for pol in ("local", "coinfer"):
        rs = ue["streams"][pol]["requests"]
        reqs += [(r["t_wall"], r["call_ms"], pol) for r in rs]
        thr = defaultdict(float)
        for r in rs:
            for k, v in (r.get("thread_cpu_ms") or {}).items():
                if v > 0:
                    thr[re.sub(r"[-_]?\d+$", "", k)] += v / len(rs)
        out[pol] = {"call_ms": mean([r["call_ms"] for r in rs]), "cpu_ms": mean([r["cpu_ms"] for r in rs]),
                    "ops_cpu_ms": mean([r.get("run_whole_cpu_ms") for r in rs]),
                    "gc_ms": mean([sum(r["gc"]["ms"]) for r in rs if r.get("gc")]),
                    "gc_n": [sum(r["gc"]["n"][g] for r in rs if r.get("gc")) for g in range(3)],
                    "threads_ms": {k: round(v, 1) for k, v in sorted(thr.items(), key=lambda kv: -kv[1])[:5]}}
    reqs.sort()
    gaps = [b[0] - (a[0] + a[1] / 1e3) for a, b in itertools.pairwise(reqs)]
    out["gaps_ms"] = {"sum": round(sum(gaps) * 1e3), "max": round(max(gaps) * 1e3), "n": len(gaps)}
    out["first_request_after_stream_start_s"] = round(reqs[0][0] - ue["start_wall"], 2)
    out["builds"] = ue.get("builds")
    out["closes"] = ue.get("closes")
    out["process_cpu_s"] = ue.get("process_cpu_s")
    out["gc_stats"] = ue.get("gc_stats")
    return out


def multi(run: Path) -> dict:
    ue = json.loads((run / "multi" / "logs" / "ue0.json").read_text())
    rows = [r for r in json.loads((run / "multi" / "results.json").read_text()) if r["scenario"] == "multi_ue"]
    rs = ue["streams"]["coinfer"]["requests"]
    first, end = rs[0]["t_wall"], max(r["t_wall"] + r["call_ms"] / 1e3 for r in rs)
    return {"requests_sum_s": round(sum(r["call_ms"] for r in rs) / 1e3, 2),
            "cpu_ms": mean([r["cpu_ms"] for r in rs]),
            "latency_ms": [round(r["call_ms"]) for r in rs],
            "requests_span_s": round(end - first, 2),
            "with_startup_s": round(ue["end_wall"] - ue["start_wall"], 2),
            "start_to_first_request_s": round(first - ue["start_wall"], 2),
            "last_request_to_end_s": round(ue["end_wall"] - end, 2),
            "bench_wall_s": round(rows[0]["wall_s"], 2), "bench_rps": round(rows[0]["server_throughput_rps"], 2),
            "builds": ue.get("builds"), "closes": ue.get("closes")}


def load(run: Path) -> str:
    def one(name):
        t = (run / name).read_text()
        m = re.search(r"load average: ([\d.]+), ([\d.]+), ([\d.]+)", t)
        return m.group(1) if m else "?"
    return f"{one('load_before.txt')} -> {one('load_after.txt')}"


def main(argv: list[str]) -> None:
    summary = {}
    print("| run | load 1-min | cell s | local call / CPU / ops CPU ms | coinfer call / CPU ms | gaps sum / max ms"
          " | 1st req after stream start s | builds CPU ms | multi N=1: requests sum / span / with start-up s, "
          "start->1st req s, bench req/s |")
    print("|---" * 9 + "|")
    for d in argv:
        run = Path(d)
        row = {"load": load(run)}
        try:
            row["cell"] = cell(run)
        except (OSError, KeyError, ValueError) as e:
            row["cell"] = {"error": repr(e)}
        try:
            row["multi"] = multi(run)
        except (OSError, KeyError, ValueError, IndexError) as e:
            row["multi"] = {"error": repr(e)}
        summary[run.name] = row
        c, mu = row["cell"], row["multi"]
        lo, co = c.get("local", {}), c.get("coinfer", {})
        b = [x["cpu_ms"] for x in (c.get("builds") or [])]
        print(f"| {run.name} | {row['load']} | {c.get('cell_s')} | {lo.get('call_ms')} / {lo.get('cpu_ms')} / "
              f"{lo.get('ops_cpu_ms')} | {co.get('call_ms')} / {co.get('cpu_ms')} | "
              f"{c.get('gaps_ms', {}).get('sum')} / {c.get('gaps_ms', {}).get('max')} | "
              f"{c.get('first_request_after_stream_start_s')} | {', '.join(f'{x:.0f}' for x in b) or '-'} | "
              f"{mu.get('requests_sum_s')} / {mu.get('requests_span_s')} / {mu.get('with_startup_s')}, "
              f"{mu.get('start_to_first_request_s')}, {mu.get('bench_rps')} |")
    (Path(__file__).parent / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
