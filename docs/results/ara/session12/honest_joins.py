"""Planner CPU of honest ARA joins (mjoa, captured zoo graphs, one after another): against the global bucket."""
import json, sys, time
from partitioner import CostGraph, Link
from partitioner.allocation import Allocator
names = ["resnet18", "mobilenet_v2", "googlenet", "resnet50", "densenet121", "vit_b_16", "vit_small", "resnet18"]
d = "/work/wt/ara/docs/results/cold/session10/costgraphs/"
a = Allocator(policy="mjoa")
rows, total = [], 0.0
for i, n in enumerate(names):
    g = CostGraph.from_json(open(d + n + ".json").read())
    t = time.thread_time()
    a.join(f"ue{i}", g, Link(20.0 + 10 * i, None, 5.0))
    dt = time.thread_time() - t
    total += dt
    rows.append({"ue": i, "model": n, "ops": len(g), "join_cpu_s": dt, "cumulative_cpu_s": total})
    print(f"join {i} {n:<13} {len(g):>4} ops  {dt:6.2f} CPU s  cumulative {total:6.2f}", flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
