"""Warm requests on the same split, two clients in one process against one real ``coinfer-edge`` (this
checkout): coinfer (``auto``, its weights uploaded through its session) and a fixed-split client whose weights
were held at connect (neurosurgeon-serial's client: the same split, uploaded by an earlier client of the same
tenant). ``N`` warm requests each, alternated (A B, B A, ...); per request the process CPU, the calling thread's
CPU, each thread's CPU (``/proc/self/task/*/schedstat``, ``testbed.bench.worker.thread_cpu_ns``) and
``plan_cpu_ms``; medians per client. ``prof``: cProfile (thread CPU timer) of the calling thread, per-function
totals per request in /tmp/warm_vs_fixed_MODEL_{coinfer,fixed}.json. Session 22 (plan22).

    cd CHECKOUT && PYTHONPATH=$PWD flock /work/wt/.bench.lock python \\
        /work/wt/plan22/docs/results/plan_ms/session22/warm_vs_fixed.py resnet18 400 40 [prof]
"""

from __future__ import annotations

import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, "bench")
import torch
from edge_process import edge_server

from modelgraph import capture
from modelgraph.tv_compat import import_torchvision
from partitioner.costgraph import CostGraph
from partitioner.uecpu import UeCpu
from testbed.bench.worker import _thread_ms, thread_cpu_ns
from ue_client import CoinferClient, new_tenant


def main() -> None:
    tv = import_torchvision()
    torch.set_num_threads(1)
    m, mbps, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    prof = len(sys.argv) > 4 and sys.argv[4] == "prof"
    with edge_server(Path(".").resolve()) as port:
        x = torch.randn(1, 3, 224, 224)
        g = capture(getattr(tv.models, m)().eval(), (x,), name=m)
        costs = CostGraph.from_json(Path("docs/results/cold/session10/costgraphs") / f"{m}.json").scaled(ue=10.0)

        def client(tenant: str, **k) -> CoinferClient:
            return CoinferClient(g, (x,), server=f"127.0.0.1:{port}", link={"uplink_mbps": mbps, "rtt_ms": 5.0},
                                 ue_slowdown=10.0, costs=costs, probe=False, send_cpu=UeCpu(send_ms_per_byte=1e-5),
                                 plan_background=False, timeout_ms=120000.0, policy="auto", tenant=tenant,
                                 horizon=40, **k)

        a = client(new_tenant())
        for _ in range(14):
            a(x)
        so = a.engine.decisions.last[1].server_ops
        print("coinfer split", len(so), "of", len(g.ops), a.last_report.plan_why)
        tb = new_tenant()
        b0 = client(tb, server_ops=sorted(so))
        b0(x)
        b0.engine.uploads.wait_uploads(60)
        b0(x)
        b0.close()
        b = client(tb, server_ops=sorted(so))
        for _ in range(3):
            b(x)
            a(x)
        print("fixed:", b.last_report.plan_why, "held at connect", len(b.engine.uploads.query_held))
        rows: dict[str, list] = {"coinfer": [], "fixed": []}
        profs: dict[str, pstats.Stats | None] = {"coinfer": None, "fixed": None}
        for i in range(n):
            for name, c in (("coinfer", a), ("fixed", b)) if i % 2 == 0 else (("fixed", b), ("coinfer", a)):
                time.sleep(0.05)
                p = cProfile.Profile(timer=time.thread_time) if prof else None
                t0, pc, tt = thread_cpu_ns(), time.process_time(), time.thread_time()
                if p:
                    p.enable()
                c(x)
                if p:
                    p.disable()
                tt, pc = (time.thread_time() - tt) * 1e3, (time.process_time() - pc) * 1e3
                r = c.last_report
                rows[name].append({"proc": pc, "main": tt, "thr": _thread_ms(t0, thread_cpu_ns()),
                                   "why": r.plan_why, "plan_cpu": r.plan_cpu_ms, "ops": r.server_ops})
                if p:
                    profs[name] = pstats.Stats(p) if profs[name] is None else (profs[name].add(p) or profs[name])
        med = statistics.median
        for name, rs in rows.items():
            print(name, "n", len(rs), f"proc med {med(r['proc'] for r in rs):.3f}",
                  f"main med {med(r['main'] for r in rs):.3f}", f"plan_cpu med {med(r['plan_cpu'] for r in rs):.3f}",
                  "whys", sorted({r["why"] for r in rs}), "ops", sorted({r["ops"] for r in rs}))
            names = sorted({k for r in rs for k in r["thr"]})
            print("   threads:", {k: round(med(r["thr"].get(k, 0.0) for r in rs), 3) for k in names})
        d = [ra["proc"] - rb["proc"] for ra, rb in zip(rows["coinfer"], rows["fixed"], strict=True)]
        print(f"proc diff (coinfer - fixed) median {med(d):.3f}")
        if prof:
            for name, st in profs.items():
                tot = {f"{f}:{ln}({fn})": (tt_ / n * 1e3, ct / n * 1e3, nc / n)
                       for (f, ln, fn), (_cc, nc, tt_, ct, _) in st.stats.items()}
                Path(f"/tmp/warm_vs_fixed_{m}_{name}.json").write_text(json.dumps(tot))
        a.close()
        b.close()


if __name__ == "__main__":
    main()
