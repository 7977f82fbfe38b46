# ruff: noqa: E402, E501, E741, SIM115, B007, B023  (measurement scripts of session 29b, kept as run)
"""Per-stage thread CPU of replayed searches (wrappers around planning's stages), first pass and repeats."""
import collections
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[4]
COST = ROOT / "docs/results/cold/session10/costgraphs"
from partitioner import online
from partitioner.costgraph import CostGraph
from ue_client import planning

calls = pickle.load(open(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent / "calls.pkl"), "rb"))
REP = int(sys.argv[2]) if len(sys.argv) > 2 else 10
acc = collections.defaultdict(float)
depth = [0]
def wrap(mod, name, label):
    f = getattr(mod, name)
    def w(*a, **k):
        if depth[0]:
            return f(*a, **k)
        depth[0] += 1
        c = time.thread_time()
        try:
            return f(*a, **k)
        finally:
            acc[label] += time.thread_time() - c
            depth[0] -= 1
    setattr(mod, name, w)
wrap(planning, "_invest_best", "invest")
wrap(planning, "_prefetch_best", "prefetch")
wrap(planning, "_gradual_best", "gradual")
wrap(planning, "_scorer", "scorer")
wrap(planning._Score, "std", "spread")
wrap(online.OnlineTable, "decide", "table.decide")
wrap(online.OnlineTable, "background", "table.background")
wrap(online.OnlineTable, "suffix_targets", "suffix_targets")
wrap(planning._Score, "__call__", "score()")
wrap(planning._Score, "order", "order")
wrap(planning, "prepare", "prepare")
buf = np.zeros(4_000_000)
bases = {}
for c in calls:
    if c["model"] not in bases:
        bases[c["model"]] = CostGraph.from_json(COST / f"{c['model']}.json").scaled(ue=10.0)
res = collections.defaultdict(list)
for rep in range(REP + 1):
    for i, c in enumerate(calls):
        costs = bases[c["model"]].scaled(ue=c["f"][0], server=c["f"][1])
        buf += 1.0
        acc.clear()
        c0 = time.thread_time()
        planning.choose(c["policy"], costs, c["link"], **c["kw"])
        tot = time.thread_time() - c0
        res[i].append((tot, dict(acc)))
labels = ["scorer", "prepare", "table.decide", "table.background", "suffix_targets", "invest", "prefetch", "gradual", "score()", "order", "spread"]
print("call model | first: total " + " ".join(labels))
for i, c in enumerate(calls):
    tot, a = res[i][0]
    print(f"{i} {c['model']} first {tot*1e3:.3f} " + " ".join(f"{l}={a.get(l,0)*1e3:.3f}" for l in labels))
    tots = sorted(r[0] for r in res[i][1:])
    med = lambda l: sorted(r[1].get(l, 0) for r in res[i][1:])[len(res[i][1:])//2]
    print(f"{i} {c['model']} rep-med {tots[len(tots)//2]*1e3:.3f} " + " ".join(f"{l}={med(l)*1e3:.3f}" for l in labels))
