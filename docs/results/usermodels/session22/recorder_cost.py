"""The per-forward cost of ``traced_reads``' recorder (the profile function of capture's check forward):
torchvision's resnet18 and densenet121, one eager forward without grad at one thread, plain and under
``traced_reads(module, Drawn())``, alternated 7 times in one process (median ms). One JSON line on stdout.

    PYTHONPATH=$TREE .venv/bin/python docs/results/usermodels/session22/recorder_cost.py TAG
"""
import json
import statistics
import sys
import time

import torch

from modelgraph.pystate import Drawn, traced_reads
from modelgraph.tv_compat import import_torchvision

torch.set_num_threads(1)
tv = import_torchvision()
out = {"tree": sys.argv[1] if len(sys.argv) > 1 else ""}
for name in ("resnet18", "densenet121"):
    m = getattr(tv.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    plain, traced = [], []
    with torch.no_grad():
        m(x)
        for _ in range(7):
            t0 = time.perf_counter()
            m(x)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with traced_reads(m, Drawn()):
                m(x)
            traced.append(time.perf_counter() - t0)
    out[name] = {"plain_ms": round(statistics.median(plain) * 1e3, 1),
                 "traced_ms": round(statistics.median(traced) * 1e3, 1)}
print(json.dumps(out))
