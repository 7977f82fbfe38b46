"""Compare testbed stream runs at a 10 % UE, before / after (coinfer's stream requests only): requests over 5 % of
their latency in planning at the UE's share (``plan_cpu_ms`` / 0.1) and of wall (``plan_ms``), how many of the wall
misses waited >= 5 ms beyond their CPU, the summed ``plan_cpu_ms`` per cell, ``plan_cpu_ms`` per decision path
(``classify.path_of``), and the wall misses a throttle falling at random in the window would give (the sum of
``plan_cpu_ms`` / 1 ms over the requests where one 9.2 ms wait is over 5 %).

    python docs/results/plan_ms/session21/compare_ab.py NAME=DIR [NAME=DIR ...]   (DIR: a bench --out folder)
"""

from __future__ import annotations

import collections
import glob
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "session20"))
from classify import path_of


def rows_of(d: str, cpu: float = 0.1) -> list[tuple[str, dict]]:
    out = []
    for f in sorted(glob.glob(str(Path(d) / "logs" / "ue*.json"))):
        j = json.loads(Path(f).read_text())
        sp = j.get("spec")
        if (not sp or sp.get("cpu") != cpu or "local" not in sp.get("policies", ())
                or "coinfer" not in j.get("streams", {})):
            continue
        cell = f"{sp['model'].split(':')[-1]}/{int(sp['uplink_mbps'])}"
        out += [(cell, r) for r in j["streams"]["coinfer"]["requests"]]
    return out


def main() -> None:
    sides = [a.split("=", 1) for a in sys.argv[1:]]
    print("| side | requests | over 5 % at share | over 5 % wall | of them waited >= 5 ms | expected wall misses "
          "(sum cpu / 1 ms) | summed plan_cpu_ms | split reuses: plan_cpu_ms median (n) |")
    print("|---|---|---|---|---|---|---|---|")
    per_cell, per_path = {}, {}
    for name, d in sides:
        rows = rows_of(d)
        share = [r for _, r in rows if r["plan_cpu_ms"] / 0.1 > 0.05 * r["latency_ms"]]
        wall = [r for _, r in rows if r["plan_ms"] > 0.05 * r["latency_ms"]]
        waited = [r for r in wall if r["plan_ms"] - r["plan_cpu_ms"] >= 5]
        exp = sum(min(1.0, r["plan_cpu_ms"]) for _, r in rows if 0.05 * r["latency_ms"] < 9.2)
        sr = [r["plan_cpu_ms"] for _, r in rows if r["server_ops"] and path_of(r) == "reused (session)"]
        print(f"| {name} | {len(rows)} | {len(share)} | {len(wall)} | {len(waited)} | {exp:.2f} | "
              f"{sum(r['plan_cpu_ms'] for _, r in rows):.2f} | "
              f"{statistics.median(sr) if sr else float('nan'):.3f} ({len(sr)}) |")
        c = collections.defaultdict(float)
        p = collections.defaultdict(list)
        for cell, r in rows:
            c[cell] += r["plan_cpu_ms"]
            p[path_of(r)].append(r["plan_cpu_ms"])
        per_cell[name], per_path[name] = c, p
    names = [n for n, _ in sides]
    print("\n| cell | " + " | ".join(f"{n}: summed plan_cpu_ms" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for cell in sorted(set().union(*(c.keys() for c in per_cell.values()))):
        print(f"| {cell} | " + " | ".join(f"{per_cell[n].get(cell, float('nan')):.2f}" for n in names) + " |")
    print("\n| path | " + " | ".join(f"{n}: n, plan_cpu_ms median (max)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for path in sorted(set().union(*(p.keys() for p in per_path.values()))):
        cells = []
        for n in names:
            xs = per_path[n].get(path, [])
            cells.append(f"{len(xs)}, {statistics.median(xs):.3f} ({max(xs):.3f})" if xs else "0")
        print(f"| {path} | " + " | ".join(cells) + " |")
    print("\nEvery request over 5 % (wall or share):")
    for name, d in sides:
        for cell, r in rows_of(d):
            lat = r["latency_ms"]
            if r["plan_ms"] > 0.05 * lat or r["plan_cpu_ms"] / 0.1 > 0.05 * lat:
                print(f"  {name} {cell} request {r['i']}: {path_of(r)}, cpu {r['plan_cpu_ms']:.3f}, wall "
                      f"{r['plan_ms']:.2f}, latency {lat:.0f} ms ({r['plan_why'][:60]})")


if __name__ == "__main__":
    main()
