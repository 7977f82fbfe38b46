"""Warm medians (requests 1-7 of each stream) of latency_ms, cpu_ms, plan_ms, plan_cpu_ms per model and policy from
testbed result dirs: python testbed_summary.py testbed_after testbed_before (writes testbed_summary.json here)."""
import json, glob, statistics as st, sys
rows = {}
for d in sys.argv[1:]:
    for f in sorted(glob.glob(f"{d}/logs/ue*.json")):
        j = json.load(open(f))
        sp = j.get("spec")
        if not sp or "streams" not in j: continue
        model = sp.get("model", "?").split(":")[-1]
        for p, s in j["streams"].items():
            rs = s.get("requests", [])[1:]
            if not rs: continue
            m = lambda k: round(st.median(r[k] for r in rs), 3)
            out = dict(n=len(rs), latency_ms=m("latency_ms"), cpu_ms=m("cpu_ms"), plan_ms=m("plan_ms"), plan_cpu_ms=m("plan_cpu_ms"),
                       server_ops=m("server_ops"), whys=[(r.get("plan_why") or "")[:10] for r in rs])
            rows.setdefault(d, {})[f"{model}/{p}"] = out
            print(d.split('/')[-1], model, p, {k: v for k, v in out.items()})
json.dump(rows, sys.stdout if False else open("testbed_summary.json", "w"), indent=1)
