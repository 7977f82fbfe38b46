"""A user's package imported from the base interpreter's site-packages (a venv made with
--system-site-packages, or a PYTHONPATH entry under the base prefix): its code's path starts with the base stdlib dir
(_STDLIB holds sysconfig's 'stdlib', the base /.../lib/python3.11/) and not with _SITE (only the venv's
site-packages), so _drawer_kind files its draws as the standard library's: not refused, captured, wrong.
The module's code is compiled under such a path (nothing is written there)."""

import os
import sysconfig

import torch

from modelgraph import pystate
from modelgraph.capture import capture
from modelgraph.errors import CaptureError
from modelgraph.execute import run_graph

base_site = os.path.join(sysconfig.get_paths()["stdlib"], "site-packages", "usernet", "model.py")
src = """
import torch
from torch import nn
class Noisy(nn.Module):
    def __init__(self, seed):
        super().__init__(); self.fc = nn.Linear(4, 4); self.rng = __import__("random").Random(seed)
    def forward(self, x):
        return self.fc(x) * (1.0 if self.rng.random() < 0.5 else -1.0)
"""
ns = {"__name__": "usernet.model"}
exec(compile(src, base_site, "exec"), ns)
print("file:", base_site, "->", {0: "random", 1: "LIB", 2: "user"}[pystate._drawer_kind(ns["Noisy"].forward.__code__)])
caught = wrong = 0
for seed in range(1, 6):
    torch.manual_seed(seed)
    m = ns["Noisy"](seed).eval()
    x = torch.randn(2, 4)
    try:
        g = capture(m, (x,))
    except CaptureError:
        caught += 1
        continue
    with torch.no_grad():
        wrong += sum(not torch.allclose(run_graph(g, (x,)), m(x), atol=1e-5) for _ in range(10))
print(f"refused {caught}/5, captured {5 - caught}/5, wrong calls {wrong}/{(5 - caught) * 10}")
