"""Capture's cost in CPU time (``time.process_time``: less sensitive than wall time to other processes on a loaded
machine; torch at one thread) and wall time: torchvision's resnet18 and densenet121 captured 3 times each after one
warm capture, medians in ms, with how many extra eager forwards capture's state check ran (``_run_once_more``). One
JSON line on stdout.

    PYTHONPATH=$TREE .venv/bin/python docs/results/usermodels/session22/capture_cpu.py TAG
"""
import json
import statistics
import sys
import time

import torch

import modelgraph.capture  # noqa: F401 (the submodule; the package exports a function of that name)
from modelgraph.tv_compat import import_torchvision

mc = sys.modules["modelgraph.capture"]
torch.set_num_threads(1)
tv = import_torchvision()
runs = [0]
if hasattr(mc, "_run_once_more"):
    real = mc._run_once_more

    def counted(*a, **k):
        runs[0] += 1
        return real(*a, **k)
    mc._run_once_more = counted
out = {"tree": sys.argv[1] if len(sys.argv) > 1 else ""}
for name in ("resnet18", "densenet121"):
    m = getattr(tv.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    mc.capture(m, (x,))
    cpu, wall = [], []
    runs[0] = 0
    for _ in range(3):
        c0, w0 = time.process_time(), time.perf_counter()
        mc.capture(m, (x,))
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    out[name] = {"cpu_ms_median": round(statistics.median(cpu) * 1e3, 1), "wall_ms_median":
                 round(statistics.median(wall) * 1e3, 1), "extra_forwards_per_capture": runs[0] / 3}
print(json.dumps(out))
