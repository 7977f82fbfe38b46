"""How many extra eager forwards (``capture._run_once_more``) and graph runs (``execute.run_graph``) one capture of
five torchvision models runs (counts, not timings). One JSON line on stdout.

    PYTHONPATH=$TREE .venv/bin/python docs/results/usermodels/session22/extra_runs.py TAG
"""
import json
import sys

import torch

import modelgraph.capture  # noqa: F401 (the submodule; the package exports a function of that name)
import modelgraph.execute as ex
from modelgraph.tv_compat import import_torchvision

mc = sys.modules["modelgraph.capture"]
torch.set_num_threads(1)
tv = import_torchvision()
n = {"forwards": 0, "graph_runs": 0}
real, rg = mc._run_once_more, ex.run_graph


def once_more(*a, **k):
    n["forwards"] += 1
    return real(*a, **k)


def graph_run(*a, **k):
    n["graph_runs"] += 1
    return rg(*a, **k)


mc._run_once_more, ex.run_graph = once_more, graph_run
out = {"tree": sys.argv[1] if len(sys.argv) > 1 else ""}
for name in ("resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0", "vit_b_16"):
    m = getattr(tv.models, name)().eval()
    n.update(forwards=0, graph_runs=0)
    mc.capture(m, (torch.randn(1, 3, 224, 224),))
    out[name] = dict(n)
print(json.dumps(out))
