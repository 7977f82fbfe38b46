"""Planner CPU of honest ARA joins (mjoa, captured zoo graphs, one after another): against the global bucket.

``PYTHONPATH=CHECKOUT python docs/results/ara/session12/honest_joins.py OUT.json`` (under the bench lock)."""

import json
import sys
import time
from pathlib import Path

from partitioner import CostGraph, Link
from partitioner.allocation import Allocator

names = ["resnet18", "mobilenet_v2", "googlenet", "resnet50", "densenet121", "vit_b_16", "vit_small", "resnet18"]
d = Path(__file__).resolve().parents[2] / "cold" / "session10" / "costgraphs"
a = Allocator(policy="mjoa")
rows, total = [], 0.0
for i, n in enumerate(names):
    g = CostGraph.from_json((d / f"{n}.json").read_text())
    t = time.thread_time()
    a.join(f"ue{i}", g, Link(20.0 + 10 * i, None, 5.0))
    dt = time.thread_time() - t
    total += dt
    rows.append({"ue": i, "model": n, "ops": len(g), "join_cpu_s": dt, "cumulative_cpu_s": total})
    print(f"join {i} {n:<13} {len(g):>4} ops  {dt:6.2f} CPU s  cumulative {total:6.2f}", flush=True)
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
