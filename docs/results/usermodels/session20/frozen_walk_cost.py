"""What ``live_rngs`` costs with and without ``gc.freeze()`` (the ``gc.get_referents`` walk over the frozen objects)
in a process with torch + torchvision imported and a resnet18 built: median of 5 calls each, ms; one JSON line."""
import gc
import json
import statistics
import time

import torch

from modelgraph.pystate import live_rngs
from modelgraph.tv_compat import import_torchvision

tv = import_torchvision()
model = tv.models.resnet18().eval()
torch.manual_seed(0)


def median_ms() -> float:
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        live_rngs()
        ts.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(ts), 1)


out = {"tracked_objects": len(gc.get_objects()), "live_rngs_ms": median_ms()}
gc.freeze()
out["frozen_objects"] = gc.get_freeze_count()
out["live_rngs_frozen_ms"] = median_ms()
gc.unfreeze()
print(json.dumps(out))
