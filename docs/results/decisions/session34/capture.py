# ruff: noqa: E402
"""Record every ``planning.choose`` call of ``bench/bench_request_plan.py``'s UE child (run in this process against
a fresh ``coinfer-edge serve``): per call its inputs (pickled; the calibrated graph as (model, ue factor, server
factor) of the base the client was given), its thread CPU in the client and its answer. Session 29b's
``capture.py``, for today's policies and request count.

    PYTHONPATH=ROOT python capture.py [--models resnet18,googlenet,mobilenet_v2] [--policies auto,mjoa]
        [--requests 8] [--out calls.pkl]
"""

import argparse
import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "bench"))
import bench_request_plan as brp
from edge_process import edge_server

from partitioner.costgraph import CostGraph
from ue_client import planning

calls: list[dict] = []
bases: dict[int, str] = {}
orig = planning.choose


def choose(policy, costs, link, **kw):
    src = costs.scaled_from()
    f = (1.0, 1.0) if src is None or id(src[0]) not in bases else (src[1], src[2])
    c0 = time.thread_time()
    r = orig(policy, costs, link, **kw)
    dt = (time.thread_time() - c0) * 1e3
    calls.append(
        {
            "model": bases.get(id(src[0]) if src else id(costs), bases.get(id(costs))),
            "f": f,
            "policy": policy,
            "link": link,
            "kw": kw,
            "cpu_ms": dt,
            "answer": r,
        }
    )
    return r


planning.choose = choose
orig_from_json = CostGraph.from_json.__func__


class _Wrap:
    def __init__(self, g10):
        self.g10 = g10

    def scaled(self, ue=1.0, server=1.0):
        assert ue == 10.0 and server == 1.0
        return self.g10


def from_json(cls, p, *a, **k):
    g10 = orig_from_json(cls, p, *a, **k).scaled(ue=10.0)
    bases[id(g10)] = Path(p).stem
    return _Wrap(g10)


CostGraph.from_json = classmethod(from_json)

ap = argparse.ArgumentParser()
ap.add_argument("--models", default="resnet18,googlenet,mobilenet_v2")
ap.add_argument("--policies", default="auto,mjoa")
ap.add_argument("--requests", type=int, default=8)
ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "calls.pkl"))
a = ap.parse_args()
with edge_server(ROOT) as port:
    args = argparse.Namespace(
        models=a.models,
        policies=a.policies,
        requests=a.requests,
        uplink_mbps=400.0,
        cpus=None,
        probe_ms=0.3,
        server=f"127.0.0.1:{port}",
        costgraphs=str(ROOT / brp.COSTGRAPHS),
    )
    brp.child(args)
for i, c in enumerate(calls):
    st = c["kw"].get("state")
    print(
        i,
        c["model"],
        c["policy"],
        c["f"],
        f"{c['cpu_ms']:.3f}",
        c["kw"].get("horizon"),
        None if st is None else (len(st.held), len(st.in_flight)),
        c["answer"].reason[:60],
    )
with open(a.out, "wb") as fh:
    pickle.dump(calls, fh)
