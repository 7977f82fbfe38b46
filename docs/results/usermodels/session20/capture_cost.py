"""What the draw watch costs a capture in a process with torch + torchvision imported: torchvision's resnet18
captured 5 times (median wall ms), and a 2-layer MLP captured with no extra generators, with 20,000
``random.Random`` and 20,000 NumPy Generators alive (ms, RSS growth). Run from a tree's root with PYTHONPATH=that
root; one JSON line on stdout."""
import json
import random
import resource
import statistics
import sys
import time

import numpy as np
import psutil
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.tv_compat import import_torchvision

tv = import_torchvision()
proc = psutil.Process()
torch.manual_seed(0)
out = {"tree": sys.argv[1] if len(sys.argv) > 1 else ""}
r18 = tv.models.resnet18().eval()
x = torch.randn(1, 3, 224, 224)
capture(r18, (x,))
times = []
for _ in range(5):
    t0 = time.perf_counter()
    capture(r18, (x,))
    times.append((time.perf_counter() - t0) * 1e3)
out["resnet18_capture_ms_median"] = round(statistics.median(times), 1)
m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
xm = torch.randn(2, 16)
capture(m, (xm,))


def run(tag):
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    capture(m, (xm,))
    out[f"{tag}_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    out[f"{tag}_rss_growth_mib"] = round((proc.memory_info().rss - rss0) / 2**20, 1)
    out[f"{tag}_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


run("mlp")
agents = [random.Random(i) for i in range(20_000)]
run("mlp_20k_random")
gens = [np.random.default_rng(i) for i in range(20_000)]
run("mlp_20k_random_20k_numpy")
print(json.dumps(out))
