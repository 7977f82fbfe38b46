# ruff: noqa: E402, E501, E701, SIM115  (measurement scripts of session 29b, kept as run)
"""Replay captured planning.choose calls in a fresh process, in order, per model; CPU ms per call.
--prof I: cProfile call I (restricted print). --repeat R: after the sequence, repeat each call R times."""
import argparse
import cProfile
import pickle
import pstats
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[4]
COST = ROOT / "docs/results/cold/session10/costgraphs"
ap = argparse.ArgumentParser()
ap.add_argument("--calls", default=str(Path(__file__).resolve().parent / "calls.pkl"))
ap.add_argument("--prof", type=int, default=-1)
ap.add_argument("--flush-mb", type=float, default=32)
ap.add_argument("--repeat", type=int, default=0)
ap.add_argument("--models", default="")
a = ap.parse_args()
from partitioner.costgraph import CostGraph
from ue_client import planning

calls = pickle.load(open(a.calls, "rb"))
buf = np.zeros(int(a.flush_mb * 1e6 / 8)) if a.flush_mb else None
bases = {}
out = []
for i, c in enumerate(calls):
    m = c["model"]
    if a.models and m not in a.models.split(","):
        continue
    if m not in bases:
        bases[m] = CostGraph.from_json(COST / f"{m}.json").scaled(ue=10.0)
    b = bases[m]
    costs = b.scaled(ue=c["f"][0], server=c["f"][1])
    if buf is not None:
        buf += 1.0
    pr = cProfile.Profile() if i == a.prof else None
    c0 = time.thread_time()
    if pr: pr.enable()
    r = planning.choose(c["policy"], costs, c["link"], **c["kw"])
    if pr: pr.disable()
    dt = (time.thread_time() - c0) * 1e3
    same = sorted(r.server_ops) == c["server_ops"] and r.predicted_ms == c["predicted_ms"] and r.background == c["background"]
    out.append((i, m, dt))
    print(f"{i} {m} {dt:.3f} (real {c['cpu_ms']:.3f}) same={same}")
    if pr:
        st = pstats.Stats(pr).stats
        rows = sorted(((v[3], v[2], v[1], k) for k, v in st.items()), reverse=True)
        print("cum_us tot_us ncalls func")
        for cum, tot, nc, k in rows[:70]:
            f = k[0].replace("/work/main/", "").replace("/work/main/.venv/lib/python3.11/site-packages/", "")
            print(f"{cum*1e6:8.0f} {tot*1e6:8.0f} {nc:5d} {f}:{k[1]}({k[2]})")
for _ in range(a.repeat):
    for i, c in enumerate(calls):
        m = c["model"]
        if m not in bases: continue
        costs = bases[m].scaled(ue=c["f"][0], server=c["f"][1])
        if buf is not None: buf += 1.0
        c0 = time.thread_time()
        planning.choose(c["policy"], costs, c["link"], **c["kw"])
        print(f"rep {i} {m} {(time.thread_time() - c0) * 1e3:.3f}")
