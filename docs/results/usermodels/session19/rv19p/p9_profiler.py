"""A forward drawing from a module-global NumPy Generator: refused normally; captured (and wrong) when the capture
runs under a profiler that uses sys.setprofile (cProfile here): traced_reads leaves the other profile function in
place and then records no globals, so draw_sources never sees the generator."""

import cProfile

import numpy as np
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.execute import run_graph

RNG = np.random.default_rng(2)


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * (1.0 if RNG.random() < 0.7 else -1.0)


def attempt(tag):
    global RNG
    RNG = np.random.default_rng(2)
    torch.manual_seed(0)
    m = M().eval()
    x = torch.randn(2, 4)
    try:
        g = capture(m, (x,))
    except Exception as e:
        print(tag, "refused:", str(e)[:110])
        return
    d = 0
    for _ in range(20):
        with torch.no_grad():
            d += not torch.allclose(run_graph(g, (x,)), m(x))
    print(tag, "CAPTURED; differs from eager in", d, "of 20 calls")


attempt("plain:      ")
pr = cProfile.Profile()
pr.enable()
attempt("under cProfile:")
pr.disable()
