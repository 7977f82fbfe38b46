"""DrawWatch's cost where the application holds many generators (per-agent random.Random, per-worker NumPy
Generators) or many objects: capture of a 2-layer MLP, time and peak RSS growth."""

import random
import resource
import sys
import time

import numpy as np
import psutil
import torch
from torch import nn

from modelgraph.capture import capture

p = psutil.Process()
m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
x = torch.randn(2, 16)
capture(m, (x,))


def run(tag):
    rss0 = p.memory_info().rss
    t0 = time.perf_counter()
    capture(m, (x,))
    dt = time.perf_counter() - t0
    print(
        f"{tag}: capture {dt * 1e3:.0f} ms, RSS +{(p.memory_info().rss - rss0) / 2**20:.0f} MiB, "
        f"maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
        flush=True,
    )


run("baseline")
mode = sys.argv[1]
if mode == "rngs":
    agents = [random.Random(i) for i in range(int(sys.argv[2]))]
    run(f"{len(agents)} random.Random")
    gens = [np.random.default_rng(i) for i in range(int(sys.argv[2]))]
    run(f"+ {len(gens)} numpy Generators")
else:
    objs = [[i] for i in range(int(sys.argv[2]))]
    run(f"{len(objs)} lists (gc-tracked)")
