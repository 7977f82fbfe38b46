"""How far the stream total ``auto`` predicted while connecting is from what the stream then took, per cell of a
full grid's coinfer streams (the horizon-8 decision that chose invest / prefetch / never).

For each cell: the strategy request 1's ``plan_reason`` names, its predicted stream total and the "never" total
it weighed against (both from the reason), the stream's measured total (the 8 requests' testbed latencies), the
cell's local stream's measured total; for "invest" also the warm latency the connect-time total implies
((total - request 1's prediction) / 7) against the warm requests' measured median. Cells whose first plan is
plain local (empty reason) list the measured totals only.

Usage (from the repository root): python docs/results/margin/session32/connect_bias.py [GRID_DIR]
(default docs/results/full/session31)
"""
from __future__ import annotations

import glob
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]


def main() -> None:
    grid = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/results/full/session31"
    print("| model | UE CPU | Mbit/s | first plan | predicted total | measured total | measured / predicted | "
          "never predicted | local measured | local / never | invest: warm at connect / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    seen, ratios, never = set(), [], []
    for f in sorted(glob.glob(str(grid / "logs/ue*.json")), key=lambda p: int(re.findall(r"ue(\d+)", p)[-1])):
        d = json.loads(Path(f).read_text())
        sp = d.get("spec")
        if not sp or "coinfer" not in d.get("streams", {}):
            continue
        key = (sp["model"].split(":")[-1], sp["cpu"], sp["uplink_mbps"])
        if key in seen or "local" not in d["streams"]:
            continue
        seen.add(key)
        reqs = d["streams"]["coinfer"]["requests"]
        meas = sum(r["latency_ms"] for r in reqs)
        local = sum(r["latency_ms"] for r in d["streams"]["local"]["requests"])
        reason = reqs[0]["plan_reason"]
        m = (re.match(r"(prefetch|gradual).*?(\d+) requests (\d+) ms.*?(\d+) ms never", reason)
             or re.match(r"(invest).*?(\d+) requests (\d+) ms with.*?vs (\d+) ms without", reason))
        cell = f"| {key[0]} | {key[1]:.0%} | {key[2]:.0f} |"
        if not m:
            print(f"{cell} local | | {meas:.0f} | | | {local:.0f} | | |")
            continue
        kind, h, pred, nv = m.group(1), int(m.group(2)), float(m.group(3)), float(m.group(4))
        ratios.append(meas / pred)
        never.append(local / nv)
        warm = ""
        if kind == "invest":
            w_pred = (pred - reqs[0]["predicted_ms"]) / (h - 1)
            w_meas = statistics.median(r["latency_ms"] for r in reqs[1:])
            warm = f"{w_pred:.0f} / {w_meas:.0f}"
        print(f"{cell} {kind} | {pred:.0f} | {meas:.0f} | {meas / pred:.2f} | {nv:.0f} | {local:.0f} | "
              f"{local / nv:.2f} | {warm} |")
    if ratios:
        print(f"\nmeasured / predicted over the {len(ratios)} streams that invested or prefetched: median "
              f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}; the local stream over "
              f"the 'never' total they were weighed against: median {statistics.median(never):.2f}, range "
              f"{min(never):.2f}-{max(never):.2f}")


if __name__ == "__main__":
    main()
