# ruff: noqa: E402, SIM115  (measurement script of session 30)
"""cProfile of one replayed call's first pass (the calls before it in ``calls.pkl`` run first, unprofiled, as in a
client): the top functions by own time. The profiler's overhead inflates every figure (~1.5x); it shows where the
time goes, ``stages.py`` of session 29b and ``ab_replay.py`` say how much.

    PYTHONPATH=CHECKOUT python profile_call.py CALL [ROWS]
"""

import cProfile
import pickle
import pstats
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
COST = HERE.parents[1] / "cold/session10/costgraphs"
from partitioner.costgraph import CostGraph
from ue_client import planning

calls = pickle.load(open(HERE / "calls.pkl", "rb"))
target = int(sys.argv[1])
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 30
bases = {}
buf = np.zeros(4_000_000)
for i, c in enumerate(calls[: target + 1]):
    m = c["model"]
    if m not in bases:
        bases[m] = CostGraph.from_json(COST / f"{m}.json").scaled(ue=10.0)
    costs = bases[m].scaled(ue=c["f"][0], server=c["f"][1])
    buf += 1
    pr = cProfile.Profile() if i == target else None
    if pr:
        pr.enable()
    planning.choose(c["policy"], costs, c["link"], **c["kw"])
    if pr:
        pr.disable()
        st = pstats.Stats(pr).stats
        total = max(v[3] for v in st.values())
        print(f"call {target} ({m}): {total * 1e6:.0f} us profiled; cum_us tot_us ncalls function, by own time")
        for tt, ct, nc, k in sorted(((v[2], v[3], v[1], k) for k, v in st.items()), reverse=True)[:rows]:
            f = k[0].split("/site-packages/")[-1]
            for root in (planning.__file__.rsplit("/ue_client/", 1)[0] + "/",):
                f = f.replace(root, "")
            print(f"{ct * 1e6:8.0f} {tt * 1e6:8.0f} {nc:5d} {f}:{k[1]}({k[2]})")
