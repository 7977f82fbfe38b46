import glob, json, statistics, sys
for d in sys.argv[1:]:
    for f in sorted(glob.glob(f"{d}/logs/ue*.json")):
        j = json.load(open(f))
        if "spec" not in j or "streams" not in j: continue
        print("==", d.split("/")[-1], j["spec"]["model"], f.split("/")[-1])
        for p in ("local", "neurosurgeon-serial", "coinfer"):
            if p not in j["streams"]:
                continue
            rs = j["streams"][p]["requests"]
            print(f"  {p:20s} mean {statistics.mean(r['latency_ms'] for r in rs):7.1f}  " +
                  " ".join(f"{r['latency_ms']:.0f}" for r in rs))
        for r in j["streams"]["coinfer"]["requests"][:3]:
            pp = r.get("predicted_parts") or {}
            thr = r.get("thread_cpu_ms") or {}
            top = sorted(thr.items(), key=lambda kv: -kv[1])[:4]
            print(f"   req{r['i']}: lat {r['latency_ms']:.0f} pred {r['predicted_ms'] or 0:.0f} srv_ops {r['server_ops']} "
                  f"up {r['uploaded_bytes']/1e6:.1f}MB ue_comp {r.get('ue_compute_ms') or 0:.0f} ue_pred {pp.get('ue_ms', 0):.0f} "
                  f"cpu {r['cpu_ms']:.1f} plan {r['plan_ms']:.0f} why '{(r.get('plan_reason') or r.get('plan_why') or '')[:90]}' "
                  f"thr {[(k, round(v,1)) for k, v in top]} srv {r.get('server_timings') and {k: round(v) for k, v in r['server_timings'].items()}}")
