"""Warm requests (after coinfer's / the baseline's upload) per stream policy in a bench run: mean latency, UE CPU
(ms of process CPU), plan CPU, server compute. Usage: ``python warm_cpu.py RUN_DIR [RUN_DIR ...]``."""

import json
import statistics
import sys
from pathlib import Path

for run in sys.argv[1:]:
    for log in sorted(Path(run, "logs").glob("ue*.json")):
        d = json.loads(log.read_text())
        if "streams" not in d:
            continue
        model = d["spec"].get("model")
        for p in ("coinfer", "neurosurgeon-serial", "dads-serial"):
            rs = [r for r in d["streams"].get(p, {}).get("requests", [])[1:] if not r.get("uploaded_bytes")
                  and r.get("server_ops")]
            if not rs:
                continue
            m = statistics.fmean
            st = [(r.get("server_timings") or {}).get("compute_ms", 0.0) for r in rs]
            print(f"{Path(run).name} {model} {p}: n {len(rs)} latency {m(r['latency_ms'] for r in rs):.1f} "
                  f"UE CPU {m(r.get('cpu_ms') or 0 for r in rs):.2f} "
                  f"plan CPU {m(r.get('plan_cpu_ms') or 0 for r in rs):.3f} "
                  f"server compute {m(st):.1f}")
