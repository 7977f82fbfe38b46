"""What the draw check's scan of live generators (``modelgraph.pystate.live_rngs``: one ``gc.get_objects()`` pass)
costs at capture: resnet18 in a process with torch and torchvision imported. Interleaved: the scan alone (N times)
and whole captures of resnet18 (``modelgraph.capture.capture``, check on), one thread.

Run: flock /work/wt/.bench.lock nice -n 5 env PYTHONPATH=$PWD .venv/bin/python \
    docs/results/usermodels/session19/draw_watch_cost.py > docs/results/usermodels/session19/draw_watch_cost.json
"""
import gc
import json
import statistics
import time

import torch

from modelgraph.capture import capture
from modelgraph.pystate import DrawWatch, live_rngs
from modelgraph.tv_compat import import_torchvision

torch.set_num_threads(1)
tv = import_torchvision()
m = tv.models.resnet18().eval()
x = torch.randn(1, 3, 224, 224)
capture(m, (x,))  # warm
scan, watch, cap = [], [], []
for _ in range(5):
    for _ in range(4):
        t = time.perf_counter()
        live_rngs()
        scan.append(time.perf_counter() - t)
        t = time.perf_counter()
        DrawWatch()
        watch.append(time.perf_counter() - t)
    t = time.perf_counter()
    capture(m, (x,))
    cap.append(time.perf_counter() - t)
out = {"objects_tracked": len(gc.get_objects()), "generators_found": len(live_rngs()),
       "scan_ms_median": 1e3 * statistics.median(scan), "scan_ms_max": 1e3 * max(scan),
       "drawwatch_ms_median": 1e3 * statistics.median(watch),
       "capture_resnet18_s_median": statistics.median(cap), "capture_s_all": cap,
       "scan_share_of_capture": statistics.median(watch) / statistics.median(cap)}
print(json.dumps(out, indent=1))
