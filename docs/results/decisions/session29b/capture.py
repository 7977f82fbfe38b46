# ruff: noqa: E402, E501, SIM115  (measurement scripts of session 29b, kept as run)
"""Run bench_request_plan's UE child in process with planning.choose recorded: per call its inputs (pickled, the
calibrated graph as (model, ue factor, server factor) of the base the client was given) and its thread CPU."""
import argparse
import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "bench"))
import bench_request_plan as brp
from edge_process import edge_server

from ue_client import planning

calls = []
bases = {}
orig = planning.choose
cur = {"model": None}

def choose(policy, costs, link, **kw):
    src = costs.scaled_from()
    f = (1.0, 1.0) if src is None or id(src[0]) not in bases else (src[1], src[2])
    if src is not None and id(src[0]) not in bases and id(costs) not in bases:
        print("unknown graph", file=sys.stderr)
    c0 = time.thread_time()
    r = orig(policy, costs, link, **kw)
    dt = (time.thread_time() - c0) * 1e3
    calls.append({"model": bases.get(id(src[0]) if src else id(costs), bases.get(id(costs))), "f": f,
                  "policy": policy, "link": link, "kw": kw, "cpu_ms": dt,
                  "server_ops": sorted(r.server_ops), "predicted_ms": r.predicted_ms, "reason": r.reason,
                  "background": r.background})
    return r
planning.choose = choose

from partitioner.costgraph import CostGraph

orig_from_json = CostGraph.from_json.__func__
def from_json(cls, p, *a, **k):
    g = orig_from_json(cls, p, *a, **k)
    name = Path(p).stem
    g10 = g.scaled(ue=10.0)
    bases[id(g10)] = name
    g.__dict__["_cap_g10"] = g10
    return _Wrap(g, g10)
class _Wrap:
    def __init__(self, g, g10): self.g, self.g10 = g, g10
    def scaled(self, ue=1.0, server=1.0):
        assert ue == 10.0 and server == 1.0
        return self.g10
CostGraph.from_json = classmethod(from_json)

ap = argparse.ArgumentParser()
ap.add_argument("--models", default="googlenet,resnet18")
ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "calls.pkl"))
a = ap.parse_args()
with edge_server(ROOT) as port:
    args = argparse.Namespace(models=a.models, policies="auto", requests=5, uplink_mbps=400.0, cpus=None,
                              probe_ms=0.3, server=f"127.0.0.1:{port}", costgraphs=str(ROOT / brp.COSTGRAPHS))
    brp.child(args)
for c in calls:
    print(c["model"], c["f"], f"{c['cpu_ms']:.3f}", c["kw"].get("horizon"), len(c["kw"]["state"].held) if c["kw"].get("state") else None, c["reason"][:60])
pickle.dump(calls, open(a.out, "wb"))
