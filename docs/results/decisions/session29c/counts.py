# ruff: noqa: E402, E501, SIM115  (measurement script of session 29c, kept as run)
"""The work one replayed search does, counted (deterministic, unlike its CPU time on a shared machine): per recorded
call of session 29b (replayed in order in one fresh process, as ``replay.py``), the partitions compiled, the exact
evaluations (``evaluate`` / ``evaluate_shared``) and the prefetch bound passes. Run with PYTHONPATH=<checkout>."""
import collections
import pickle
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
S29B = Path(__file__).resolve().parent.parent / "session29b"
COST = ROOT / "docs/results/cold/session10/costgraphs"
from partitioner import online
from partitioner.costgraph import CostGraph
from ue_client import planning

cnt = collections.Counter()


def wrap(holder, name, label):
    f = getattr(holder, name)

    def w(*a, **k):
        cnt[label] += 1
        return f(*a, **k)
    setattr(holder, name, w)


wrap(online, "compile_partition", "compiled")
wrap(online, "evaluate", "evaluate")
wrap(online, "evaluate_shared", "evaluate_shared")
wrap(online.OnlineTable, "prefetch_bounds", "prefetch_bounds")
calls = pickle.load(open(S29B / "calls.pkl", "rb"))
bases = {}
print(f"checkout {Path(planning.__file__).resolve().parents[1]}")
print("| call | model | compiled | evaluate | evaluate_shared | prefetch_bounds | answer |")
print("|---|---|---|---|---|---|---|")
for i, c in enumerate(calls):
    m = c["model"]
    if m not in bases:
        bases[m] = CostGraph.from_json(COST / f"{m}.json").scaled(ue=10.0)
    costs = bases[m].scaled(ue=c["f"][0], server=c["f"][1])
    cnt.clear()
    r = planning.choose(c["policy"], costs, c["link"], **c["kw"])
    same = sorted(r.server_ops) == c["server_ops"] and r.predicted_ms == c["predicted_ms"] and r.background == c["background"]
    what = "gradual" if r.gradual else "prefetch" if r.prefetch else "invest" if r.invest else "split" if r.server_ops else "local"
    print(f"| {i} | {m} | {cnt['compiled']} | {cnt['evaluate']} | {cnt['evaluate_shared']} | {cnt['prefetch_bounds']} | {what}, same={same} |")
