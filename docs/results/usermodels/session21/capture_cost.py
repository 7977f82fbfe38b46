"""What capture costs, and how much of it is the draw watch's work: torchvision's resnet18, mobilenet_v2, densenet121
and a 2-layer MLP, each captured N times in one process (median wall ms), with the heap scans
(``pystate.live_rngs``: calls, ms) and the model walks (``draw_sources``: calls, ms) counted per capture, and the
time of one eager forward for scale. Run from a tree's root with PYTHONPATH=that root; one JSON line on stdout.

    PYTHONPATH=$TREE .venv/bin/python docs/results/usermodels/session21/capture_cost.py TAG
"""
import json
import statistics
import sys
import time

import torch
from torch import nn

import modelgraph.capture  # noqa: F401 (the submodule; the package exports a function of that name)
import modelgraph.pystate as ps
from modelgraph.capture import capture
from modelgraph.tv_compat import import_torchvision

torch.set_num_threads(1)
tv = import_torchvision()
count = {"scans": [0, 0.0], "walks": [0, 0.0]}


def counted(f, key):
    def g(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            count[key][0] += 1
            count[key][1] += time.perf_counter() - t0
    return g


ps.live_rngs = counted(ps.live_rngs, "scans")
mc = sys.modules["modelgraph.capture"]
mc.draw_sources = counted(mc.draw_sources, "walks")
out = {"tree": sys.argv[1] if len(sys.argv) > 1 else ""}
torch.manual_seed(0)
models = {"mlp": (nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(2, 16), 5),
          "resnet18": (tv.models.resnet18(), torch.randn(1, 3, 224, 224), 3),
          "mobilenet_v2": (tv.models.mobilenet_v2(), torch.randn(1, 3, 224, 224), 3),
          "densenet121": (tv.models.densenet121(), torch.randn(1, 3, 224, 224), 3)}
for name, (m, x, n) in models.items():
    m.eval()
    capture(m, (x,))  # warm
    times, scans, walks = [], [], []
    for _ in range(n):
        for v in count.values():
            v[:] = [0, 0.0]
        t0 = time.perf_counter()
        capture(m, (x,))
        times.append((time.perf_counter() - t0) * 1e3)
        scans.append(tuple(count["scans"]))
        walks.append(tuple(count["walks"]))
    with torch.no_grad():
        fw = []
        for _ in range(5):
            t0 = time.perf_counter()
            m(x)
            fw.append((time.perf_counter() - t0) * 1e3)
    out[name] = {"capture_ms_median": round(statistics.median(times), 1), "capture_ms": [round(t, 1) for t in times],
                 "heap_scans": scans[-1][0], "heap_scan_ms": round(statistics.median(s[1] for s in scans) * 1e3, 1),
                 "model_walks": walks[-1][0], "walk_ms": round(statistics.median(w[1] for w in walks) * 1e3, 2),
                 "eager_forward_ms": round(statistics.median(fw), 1)}
print(json.dumps(out))
