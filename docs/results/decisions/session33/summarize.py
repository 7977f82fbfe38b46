"""Per model / policy / decision kind, before vs after: median and p99 of ``plan_cpu_ms`` (and ``plan_ms``) over
every run of ``ab.sh``. Kinds: ``search`` (a new decision: ``plan_why`` neither reused, planned ahead, followed nor
the warm target's held answer), ``warm target held`` (the held answer: a warm re-plan without a search), ``reused``,
``planned ahead`` (request 1: decided while connecting). Also paired medians of the searches (round by round).

    python docs/results/decisions/session33/summarize.py RUNS_DIR > RUNS_DIR/summary.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "bench"))
from bench_request_plan import path_of, pct

KINDS = ("search", "warm target held", "reused", "planned ahead", "followed")


def kind(why: str) -> str:
    p = path_of(why)
    return p


def main() -> None:
    d = Path(sys.argv[1])
    rows: dict = {}
    whys: dict = {}
    loads = []
    for side in ("before", "after"):
        for f in sorted(d.glob(f"{side}*.json")):
            j = json.loads(f.read_text())
            loads.append((f.name, j["load_before"][0], j["load_after"][0]))
            rnd = int(f.stem[len(side):])
            for res in j["results"]:
                for r in res["requests"]:
                    k = kind(r["plan_why"])
                    rows.setdefault((res["model"], res["policy"], k, side), []).append(
                        (r["plan_cpu_ms"], r["plan_ms"], rnd, r["request"]))
                    whys.setdefault((res["model"], res["policy"], r["request"], side), []).append(
                        (r["plan_why"], r["server_ops"]))
    print("| model | policy | kind | n before / after | plan_cpu_ms median before | after | p99 before | after |"
          " plan_ms median before | after | p99 before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in ("resnet18", "googlenet", "mobilenet_v2"):
        for pol in ("auto", "mjoa"):
            for k in KINDS:
                b, a = rows.get((m, pol, k, "before"), []), rows.get((m, pol, k, "after"), [])
                if not b and not a:
                    continue

                def med(xs, i):
                    return f"{statistics.median(x[i] for x in xs):.3f}" if xs else "-"

                def p99(xs, i):
                    return f"{pct([x[i] for x in xs], 0.99):.3f}" if xs else "-"

                print(f"| {m} | {pol} | {k} | {len(b)} / {len(a)} | {med(b, 0)} | {med(a, 0)} | {p99(b, 0)} | "
                      f"{p99(a, 0)} | {med(b, 1)} | {med(a, 1)} | {p99(b, 1)} | {p99(a, 1)} |")
    print()
    print("All decisions per model and policy (requests 1-8 of every run):")
    print()
    print("| model | policy | n | plan_cpu_ms median before | after | p99 before | after | over 1 ms before | after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in ("resnet18", "googlenet", "mobilenet_v2"):
        for pol in ("auto", "mjoa"):
            b = [x[0] for k in KINDS for x in rows.get((m, pol, k, "before"), [])]
            a = [x[0] for k in KINDS for x in rows.get((m, pol, k, "after"), [])]
            print(f"| {m} | {pol} | {len(b)} / {len(a)} | {statistics.median(b):.3f} | {statistics.median(a):.3f} | "
                  f"{pct(b, 0.99):.3f} | {pct(a, 0.99):.3f} | {sum(x > 1 for x in b)} | {sum(x > 1 for x in a)} |")
    print()
    same = diff = 0
    for (m, pol, req, side), v in whys.items():
        if side != "before":
            continue
        o = whys.get((m, pol, req, "after"))
        if o is None:
            continue
        if sorted(map(tuple, v)) == sorted(map(tuple, o)):
            same += 1
        else:
            diff += 1
    print(f"plan_why and server-op count per (model, policy, request), the multiset over runs: {same} the same, "
          f"{diff} differ")
    print()
    print("Loads (1-min average at each run's start / end): " + ", ".join(f"{n} {a:.2f}/{b:.2f}" for n, a, b in loads))


if __name__ == "__main__":
    main()
