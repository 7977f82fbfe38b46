"""plan_cpu_ms per request of the real client, before / after (bench_request_plan JSONs named brp_{side}{i}.json)."""
import json
import sys
from pathlib import Path

d = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
print("| model | request | before plan_cpu_ms | after plan_cpu_ms | plan_why (before run 1) |")
print("|---|---|---|---|---|")
runs = {s: [json.loads(p.read_text()) for p in sorted(d.glob(f"brp_{s}*.json"))] for s in ("before", "after")}
for mi, res in enumerate(runs["before"][0]["results"]):
    for ri, r in enumerate(res["requests"]):
        cell = {s: " / ".join(f"{x['results'][mi]['requests'][ri]['plan_cpu_ms']:.2f}" for x in runs[s]) for s in runs}
        print(f"| {res['model']} | {r['request']} | {cell['before']} | {cell['after']} | {r['plan_why'][:60]} |")
