"""Classify coinfer's stream requests at a 10 % UE in a testbed grid by decision path, and each one whose
``plan_ms`` (wall) or ``plan_cpu_ms`` / share is over 5 % of its latency (issue 12's planning rule).

    python docs/results/plan_ms/session20/classify.py [--logs docs/results/full/session19/logs] [--cpu 0.1]

Reads the per-UE logs (``logs/ue*.json``) of the stream cells (specs with the five stream policies), coinfer's
stream only. Paths, from the request's ``plan_why`` / ``call_mode`` / ``plan_bg``:
``planned ahead`` (request 1, decided while connecting), ``reused (session)`` / ``reused (offline)`` (the
previous decision kept; offline = a suspended session, decided through ``DecisionCache.decide``), ``held path``
(``warm target held: no search``), ``search: held`` (request after the cold upload found the target held and
searched), ``search: held,in flight``, ``search: after the last prefetch`` (trajectory left), ``search: other``,
``followed`` (a prefetch trajectory's step), ``background`` (``plan_bg`` taken / stale). ``waited``: wall - CPU
>= 5 ms (half the testbed's 10 ms CFS period).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import statistics
from pathlib import Path


def path_of(r: dict) -> str:
    why = r.get("plan_why", "")
    if r.get("plan_bg"):
        return f"background ({r['plan_bg'].split(':')[0]})"
    if why.startswith("planned ahead"):
        return "planned ahead"
    if why.startswith("reused"):
        return "reused (offline)" if r.get("offline") else "reused (session)"
    if "warm target held: no search" in why:
        return "held path (no search)"
    if why.startswith("followed"):
        return "followed"
    if "trajectory left" in why:
        return "search: after the last prefetch"
    if why.startswith("changed: held,in flight"):
        return "search: held,in flight"
    if why.startswith("changed: held"):
        return "search: held (target now held)"
    return f"search: {why.split(' (')[0]}" if why else "none"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--logs", default="docs/results/full/session19/logs")
    ap.add_argument("--cpu", type=float, default=0.1)
    a = ap.parse_args()
    rows = []
    for f in sorted(glob.glob(str(Path(a.logs) / "ue*.json"))):
        d = json.loads(Path(f).read_text())
        sp = d.get("spec")
        if not sp or sp.get("cpu") != a.cpu or "local" not in sp.get("policies", ()):
            continue
        for r in d["streams"].get("coinfer", {}).get("requests", []):
            rows.append((Path(f).stem, sp["model"].split(":")[-1], int(sp["uplink_mbps"]), r))
    print(f"{len(rows)} coinfer stream requests at {a.cpu:g} of a core in {a.logs}\n")
    print("## Every request over 5 % (wall or at the share)\n")
    print("| ue | model | uplink | request | path | plan_cpu_ms | at share ms | plan_ms (wall) | latency ms | "
          "wall % | share % | waited | plan_why |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    by = collections.defaultdict(list)
    for ue, m, up, r in rows:
        p = path_of(r)
        by[p].append(r)
        lat = r["latency_ms"]
        sh = r["plan_cpu_ms"] / a.cpu
        if r["plan_ms"] > 0.05 * lat or sh > 0.05 * lat:
            print(f"| {ue} | {m} | {up} | {r['i']} | {p} | {r['plan_cpu_ms']:.3f} | {sh:.2f} | {r['plan_ms']:.2f} | "
                  f"{lat:.0f} | {100 * r['plan_ms'] / lat:.1f} | {100 * sh / lat:.1f} | "
                  f"{'yes' if r['plan_ms'] - r['plan_cpu_ms'] >= 5 else 'no'} | {r['plan_why'][:70]} |")
    print("\n## Per path\n")
    print("| path | requests | plan_cpu_ms median (max) | over 5 % wall | of them waited >= 5 ms | over 5 % at share |")
    print("|---|---|---|---|---|---|")
    for p, rs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        cpu = [r["plan_cpu_ms"] for r in rs]
        ow = [r for r in rs if r["plan_ms"] > 0.05 * r["latency_ms"]]
        wt = [r for r in ow if r["plan_ms"] - r["plan_cpu_ms"] >= 5]
        osh = [r for r in rs if r["plan_cpu_ms"] / a.cpu > 0.05 * r["latency_ms"]]
        print(f"| {p} | {len(rs)} | {statistics.median(cpu):.3f} ({max(cpu):.3f}) | {len(ow)} | {len(wt)} | "
              f"{len(osh)} |")
    bg = collections.Counter(r.get("plan_bg", "") or "none" for _, _, _, r in rows)
    waits = [r.get("plan_wait_ms", 0.0) for _, _, _, r in rows]
    print(f"\nbackground decisions: {dict(bg)}; plan_wait_ms max {max(waits):.2f}")


if __name__ == "__main__":
    main()
