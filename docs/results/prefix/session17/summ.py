"""Stream means and coinfer's first requests of bench runs: ``python summ.py RUN_DIR...`` (-> summary.txt)."""

import glob
import json
import statistics
import sys


def main(dirs: list[str]) -> None:
    for d in dirs:
        for f in sorted(glob.glob(f"{d}/logs/ue*.json")):
            with open(f) as fh:
                j = json.load(fh)
            if "spec" not in j or "streams" not in j:
                continue
            print("==", d.split("/")[-1], j["spec"]["model"], f.split("/")[-1])
            for p in ("local", "neurosurgeon-serial", "coinfer"):
                rs = j["streams"].get(p, {}).get("requests")
                if rs:
                    lat = " ".join(f"{r['latency_ms']:.0f}" for r in rs)
                    print(f"  {p:20s} mean {statistics.mean(r['latency_ms'] for r in rs):7.1f}  {lat}")
            for r in j["streams"]["coinfer"]["requests"][:3]:
                pp = r.get("predicted_parts") or {}
                top = sorted((r.get("thread_cpu_ms") or {}).items(), key=lambda kv: -kv[1])[:4]
                why = (r.get("plan_reason") or r.get("plan_why") or "")[:90]
                st = r.get("server_timings")
                print(f"   req{r['i']}: lat {r['latency_ms']:.0f} pred {r['predicted_ms'] or 0:.0f} "
                      f"srv_ops {r['server_ops']} up {r['uploaded_bytes'] / 1e6:.1f}MB "
                      f"ue_comp {r.get('ue_compute_ms') or 0:.0f} ue_pred {pp.get('ue_ms', 0):.0f} "
                      f"cpu {r['cpu_ms']:.1f} plan {r['plan_ms']:.0f} why '{why}' "
                      f"thr {[(k, round(v, 1)) for k, v in top]} srv {st and {k: round(v) for k, v in st.items()}}")


if __name__ == "__main__":
    main(sys.argv[1:])
