"""The A/B runs of ab_send.sh: per run, the stream means per policy (ms), coinfer / best baseline, coinfer's first
two requests (latency, its decision), the send cost coinfer planned with and the run's stream bound.

Usage: python ab_table.py RUNDIR ..."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main() -> None:
    print("| run | cell | send ms/MB planned | local | NS+serial | coinfer | coinfer / best | coinfer #1 (decision) | "
          "#2 | warm #3-8 median | bound (strategy) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in map(Path, sys.argv[1:]):
        for log in sorted(p for p in (d / "logs").glob("ue*.json") if p.stem[2:].isdigit()):
            u = json.loads(log.read_text())
            sp, st = u["spec"], u["streams"]
            means = {p: statistics.fmean(r["latency_ms"] for r in s["requests"]) for p, s in st.items()}
            co = st["coinfer"]
            rs = co["requests"]
            best = min(v for p, v in means.items() if p not in ("coinfer", "local"))
            best = min(best, means["local"])
            s = 1e6 / (co["send_cpu_mbps"] * 125.0) if co.get("send_cpu_mbps") else float("nan")
            bound = ""
            md = (d / "results.md").read_text().splitlines()
            for i, line in enumerate(md):
                if line.startswith("### Stream lower bound"):
                    cols = [c.strip() for c in md[i + 6].split("|")]
                    bound = f"{cols[9]} ({cols[8]})"
            warm = statistics.median(r["latency_ms"] for r in rs[2:])
            print(f"| {d.name} | {sp['model'].split(':')[-1]} {sp['cpu']:.0%}/{sp['uplink_mbps']:.0f} | {s:.2f} | "
                  f"{means['local']:.0f} | {means['neurosurgeon-serial']:.0f} | {means['coinfer']:.0f} | "
                  f"{means['coinfer'] / best:.2f} | {rs[0]['latency_ms']:.0f} ({rs[0]['plan_reason'].split(':')[0]}) | "
                  f"{rs[1]['latency_ms']:.0f} | {warm:.0f} | {bound} |")


if __name__ == "__main__":
    main()
