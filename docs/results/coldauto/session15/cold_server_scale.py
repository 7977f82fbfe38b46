"""Grid 14's logs: does the server-scale calibration from a request that uploaded weights help the next warm
request's prediction of the server part? For each coinfer stream, the first remote request that uploaded weights
and the next request on the same split without an upload: the server part the next one predicted (after the
uploading request moved the scale: today's rule) against the one the uploading request predicted (the scale
before it: what leaving uploading requests out gives, since nothing else moved it in between), each against the
next request's measured server time (compute + queue, the calibration's own measure) and the stream's median of
warm ones.

Usage: python cold_server_scale.py [LOGDIR ...] (default: docs/results/full/session14/logs)"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(logdir: Path):
    for p in sorted((p for p in logdir.glob("ue*.json") if p.stem[2:].isdigit()), key=lambda p: int(p.stem[2:])):
        d = json.loads(p.read_text())
        co = (d.get("streams") or {}).get("coinfer")
        if not co:
            continue
        rs = co["requests"]
        sp = d["spec"]
        for j in range(len(rs) - 1):
            a, b = rs[j], rs[j + 1]
            if not (a["server_ops"] and a["uploaded_bytes"] and a.get("server_timings") and b.get("server_timings")
                    and b["server_ops"] == a["server_ops"] and not b["uploaded_bytes"]):
                continue
            warm = [r["server_timings"]["compute_ms"] + r["server_timings"]["queue_ms"] for r in rs[j + 1:]
                    if r["server_ops"] == a["server_ops"] and not r["uploaded_bytes"] and r.get("server_timings")]
            ta, tb = a["server_timings"], b["server_timings"]
            yield {"cell": f"{sp['model'].split(':')[-1]} {sp['cpu']:.0%} {sp['uplink_mbps']:.0f}", "request": j,
                   "uploaded_mb": a["uploaded_bytes"] / 1e6, "cold_measured": ta["compute_ms"] + ta["queue_ms"],
                   "before": a["predicted_parts"]["server_ms"], "after": b["predicted_parts"]["server_ms"],
                   "next_measured": tb["compute_ms"] + tb["queue_ms"], "warm_median": statistics.median(warm),
                   "why": b.get("plan_why", "")}
            break


def main() -> None:
    dirs = [Path(x) for x in sys.argv[1:]] or [Path("docs/results/full/session14/logs")]
    got = [r for d in dirs for r in rows(d)]
    print("| cell | uploading request | MB | its server ms (measured) | warm median | next: predicted today "
          "(scale moved by it) | predicted, uploads left out | measured |")
    print("|---|---|---|---|---|---|---|---|")
    for r in got:
        print(f"| {r['cell']} | #{r['request'] + 1} | {r['uploaded_mb']:.1f} | {r['cold_measured']:.0f} | "
              f"{r['warm_median']:.0f} | {r['after']:.0f} | {r['before']:.0f} | {r['next_measured']:.0f} |")
    for key in ("next_measured", "warm_median"):
        today = statistics.median(abs(r["after"] / r[key] - 1) for r in got)
        fix = statistics.median(abs(r["before"] / r[key] - 1) for r in got)
        closer = sum(abs(r["before"] - r[key]) < abs(r["after"] - r[key]) for r in got)
        print(f"against {key}: median |pred / meas - 1| today {today:.0%}, uploads left out {fix:.0%}; "
              f"closer without the uploading request in {closer} of {len(got)}")
    print("uploading request's server time / the stream's warm median: "
          + ", ".join(f"{r['cold_measured'] / r['warm_median']:.2f}" for r in got))


if __name__ == "__main__":
    main()
