"""Per-request thread CPU of named functions inside a real client's requests (plain wrappers, no profiler): a
real ``coinfer-edge`` (this checkout), one client per model and policy, UE 10x, decisions inline (as
``bench/bench_request_plan.py``), each request's ``plan_why`` path, ``plan_cpu_ms`` and, per wrapped function,
``name=us/calls`` summed over the request. Session 22 (plan22).

    cd CHECKOUT && PYTHONPATH=$PWD flock /work/wt/.bench.lock python \\
        /work/wt/plan22/docs/results/plan_ms/session22/window_parts.py googlenet auto 12 100 \\
        ue_client.uploads:UploadScheduler.server_state,ue_client.trajectory:Trajectory.follow
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, "bench")
import torch
from bench_request_plan import path_of
from edge_process import edge_server

from modelgraph import capture
from modelgraph.tv_compat import import_torchvision
from partitioner.costgraph import CostGraph, Link
from partitioner.uecpu import UeCpu
from ue_client import CoinferClient, new_tenant, planning

acc: dict[str, int] = {}
cnt: dict[str, int] = {}


def wrap(modname: str, qual: str) -> None:
    """Wrap ``modname``'s ``Class.method`` (or a function) with a thread-CPU accumulator."""
    obj = importlib.import_module(modname)
    parts = qual.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p)
    fn = getattr(obj, parts[-1])

    def w(*a, **k):
        c = time.thread_time_ns()
        try:
            return fn(*a, **k)
        finally:
            acc[qual] = acc.get(qual, 0) + time.thread_time_ns() - c
            cnt[qual] = cnt.get(qual, 0) + 1

    setattr(obj, parts[-1], w)


def main() -> None:
    tv = import_torchvision()
    torch.set_num_threads(1)
    models, pols = sys.argv[1].split(","), sys.argv[2].split(",")
    reqs, mbps = int(sys.argv[3]), float(sys.argv[4])
    for t in sys.argv[5].split(","):
        wrap(*t.split(":"))
    with edge_server(Path(".").resolve()) as port:
        for m in models:
            x = torch.randn(1, 3, 224, 224)
            g = capture(getattr(tv.models, m)().eval(), (x,), name=m)
            costs = CostGraph.from_json(Path("docs/results/cold/session10/costgraphs") / f"{m}.json").scaled(ue=10.0)
            for pol in pols:
                kw = dict(policy=pol, link={"uplink_mbps": mbps, "rtt_ms": 5.0}, tenant=new_tenant(),
                          ue_slowdown=10.0, costs=costs, probe=False, send_cpu=UeCpu(send_ms_per_byte=1e-5),
                          horizon=reqs, plan_background=False, timeout_ms=120000.0)
                if pol == "fixed":
                    so = planning.choose("neurosurgeon", costs, Link(mbps, rtt_ms=5.0)).server_ops
                    kw.update(policy="auto", server_ops=sorted(so))
                c = CoinferClient(g, (x,), server=f"127.0.0.1:{port}", **kw)
                c.engine.connect()
                for i in range(reqs):
                    acc.clear()
                    cnt.clear()
                    c(x)
                    r = c.last_report
                    parts = " ".join(f"{k.split('.')[-1]}={v / 1e3:.0f}/{cnt[k]}" for k, v in acc.items())
                    print(m, pol, i + 1, path_of(r.plan_why), f"cpu {r.plan_cpu_ms:.3f}", parts, flush=True)
                c.close()


if __name__ == "__main__":
    main()
