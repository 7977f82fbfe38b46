"""Per model / policy / decision kind, before vs after: n, median and p99 of ``plan_cpu_ms`` (the deciding thread's CPU
for the request's whole decision) and of ``plan_ms`` (its wall time) over every run of ``ab.sh``; the same over all
decisions per model and policy; the searches' medians paired by round. Kinds (``bench_request_plan.path_of``):
``search`` (a new decision), ``warm target held`` (the held answer: a warm re-plan without a search), ``reused``,
``planned ahead`` (request 1: decided while connecting), ``followed``.

    python docs/results/decisions/session34/summarize.py RUNS_DIR > RUNS_DIR/summary.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "bench"))
from bench_request_plan import path_of, pct

KINDS = ("search", "warm target held", "reused", "planned ahead", "followed")


def main() -> None:
    d = Path(sys.argv[1])
    rows: dict = {}
    loads = []
    models: list[str] = []
    policies: list[str] = []
    for side in ("before", "after"):
        for f in sorted(d.glob(f"{side}*.json"), key=lambda p: int(p.stem[len(side) :])):
            j = json.loads(f.read_text())
            loads.append((f.stem, j["load_before"][0], j["load_after"][0], j.get("commit", "")))
            rnd = int(f.stem[len(side) :])
            for res in j["results"]:
                m, pol = res["model"], res["policy"]
                models += [m] if m not in models else []
                policies += [pol] if pol not in policies else []
                for r in res["requests"]:
                    rows.setdefault((m, pol, path_of(r["plan_why"]), side), []).append(
                        (r["plan_cpu_ms"], r["plan_ms"], rnd)
                    )

    def med(xs, i):
        return f"{statistics.median(x[i] for x in xs):.3f}" if xs else "-"

    def p99(xs, i):
        return f"{pct([x[i] for x in xs], 0.99):.3f}" if xs else "-"

    print(
        "| model | policy | kind | n before / after | plan_cpu_ms median before | after | p99 before | after |"
        " plan_ms median before | after | p99 before | after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in models:
        for pol in policies:
            for k in KINDS:
                b, a = rows.get((m, pol, k, "before"), []), rows.get((m, pol, k, "after"), [])
                if not b and not a:
                    continue
                print(
                    f"| {m} | {pol} | {k} | {len(b)} / {len(a)} | {med(b, 0)} | {med(a, 0)} | {p99(b, 0)} | "
                    f"{p99(a, 0)} | {med(b, 1)} | {med(a, 1)} | {p99(b, 1)} | {p99(a, 1)} |"
                )
    print()
    print("All decisions per model and policy (every request of every run):")
    print()
    print(
        "| model | policy | n before / after | plan_cpu_ms median before | after | p99 before | after |"
        " plan_ms p99 before | after | CPU over 1 ms before | after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in models:
        for pol in policies:
            b = [x for k in KINDS for x in rows.get((m, pol, k, "before"), [])]
            a = [x for k in KINDS for x in rows.get((m, pol, k, "after"), [])]
            print(
                f"| {m} | {pol} | {len(b)} / {len(a)} | {med(b, 0)} | {med(a, 0)} | {p99(b, 0)} | {p99(a, 0)} | "
                f"{p99(b, 1)} | {p99(a, 1)} | {sum(x[0] > 1 for x in b)} | {sum(x[0] > 1 for x in a)} |"
            )
    print()
    print("Searches paired by round (after - before, the medians of the round's searches; rounds with both):")
    print()
    for m in models:
        for pol in policies:
            b, a = rows.get((m, pol, "search", "before"), []), rows.get((m, pol, "search", "after"), [])
            rb = {r: statistics.median(x[0] for x in b if x[2] == r) for r in {x[2] for x in b}}
            ra = {r: statistics.median(x[0] for x in a if x[2] == r) for r in {x[2] for x in a}}
            both = sorted(set(rb) & set(ra))
            if not both:
                continue
            diffs = [ra[r] - rb[r] for r in both]
            print(
                f"- {m} {pol}: {statistics.median(diffs):+.3f} ms, lower in {sum(x < 0 for x in diffs)} of "
                f"{len(both)} (" + ", ".join(f"{rb[r]:.2f}/{ra[r]:.2f}" for r in both) + ")"
            )
    print()
    print(
        "Runs (1-min load average at start / end, commit): "
        + ", ".join(f"{n} {a:.2f}/{b:.2f} {c}" for n, a, b, c in loads)
    )


if __name__ == "__main__":
    main()
