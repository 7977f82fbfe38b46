"""Before/after table of ``ab.sh``'s JSONs (bench/bench_request_plan.py): resnet18's requests per run, and every
decision's plan_ms / plan_cpu_ms median and p99 per side; whether each request's plan_why and server_ops match."""

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


runs = {side: [json.loads((HERE / f"{side}{i}.json").read_text()) for i in (1, 2, 3)] for side in ("before", "after")}
for side, rs in runs.items():
    print(f"{side}: " + ", ".join(f"{r['commit']} load {r['load_before'][0]:.2f}" for r in rs))
print("| request | before plan_ms (3 runs) | after plan_ms | before plan_cpu_ms | after plan_cpu_ms "
      "| plan_why (before = after?) |")
print("|---|---|---|---|---|---|")
n = len(runs["before"][0]["results"][0]["requests"])
for k in range(n):
    row = {side: [r["results"][0]["requests"][k] for r in rs] for side, rs in runs.items()}
    whys = {x["plan_why"] for s in row.values() for x in s}
    same = all(b["plan_why"] == a["plan_why"] and b["server_ops"] == a["server_ops"]
               for b, a in zip(row["before"], row["after"], strict=True))

    def f(side: str, key: str, row: dict = row) -> str:
        return " / ".join(f"{x[key]:.2f}" for x in row[side])

    print(f"| {k + 1} | {f('before', 'plan_ms')} | {f('after', 'plan_ms')} | {f('before', 'plan_cpu_ms')} | "
          f"{f('after', 'plan_cpu_ms')} | {'; '.join(sorted(whys))} ({'same per run' if same else 'differ'}) |")
for side, rs in runs.items():
    w = [x["plan_ms"] for r in rs for x in r["results"][0]["requests"]]
    c = [x["plan_cpu_ms"] for r in rs for x in r["results"][0]["requests"]]
    r23 = [x["plan_cpu_ms"] for r in rs for x in r["results"][0]["requests"][1:3]]
    print(f"{side}: {len(w)} decisions, plan_ms median {statistics.median(w):.3f} p99 {pct(w, 0.99):.3f} "
          f"max {max(w):.3f};"
          f" plan_cpu_ms median {statistics.median(c):.3f} p99 {pct(c, 0.99):.3f}; requests 2-3 plan_cpu_ms median "
          f"{statistics.median(r23):.3f}; > 1 ms: {sum(x > 1 for x in w)}, > 5 ms: {sum(x > 5 for x in w)}")
sys.exit(0)
