"""Session 19: the cost of capture's generator walk (``pystate.draw_sources``) on three torchvision models, beside one
plain and one traced forward at 64x64 (the first call warms up). Run under the bench lock:

    flock /work/wt/.bench.lock env PYTHONPATH=$PWD .venv/bin/python \\
        docs/results/usermodels/session19/probe_draw_sources_cost.py
"""

import time

import torch

from modelgraph.pystate import draw_sources, traced_reads
from modelgraph.tracelock import TORCH_TRACE_LOCK
from modelgraph.tv_compat import import_torchvision

tv = import_torchvision()
for name in ("resnet18", "densenet121", "mobilenet_v2"):
    m = getattr(tv.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    with TORCH_TRACE_LOCK, torch.no_grad():
        t0 = time.perf_counter()
        m(x)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        with traced_reads(m) as box:
            m(x)
        t_traced = time.perf_counter() - t0
    reads = box[0]
    mods = list(m.named_modules(remove_duplicate=False))
    t0 = time.perf_counter()
    for _ in range(5):
        s = draw_sources(mods, reads, name)
    t_ds = (time.perf_counter() - t0) / 5
    print(f"{name}: forward {t_plain * 1e3:.1f} ms, traced {t_traced * 1e3:.1f} ms, draw_sources "
          f"{t_ds * 1e3:.2f} ms (mean of 5), generators found {len(s)}")
