"""A deterministic model with a torch.compile'd submodule (in place, m.compile()): the check's eager forward is its
first real call, so inductor compiles there; compile-time library code (tempfile names, ...) draws from Python
generators that already existed: refused as 'draws random numbers in Python'?"""

import sys
import tempfile

import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.execute import run_graph

if "notemp" not in sys.argv:
    tempfile.mkdtemp()  # the application used tempfile before (most do): tempfile's generator exists


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


torch.manual_seed(0)
m = M().eval()
x = torch.randn(2, 8)
if sys.argv[1] == "whole":
    m.compile()
elif sys.argv[1] == "wrapper":
    m = torch.compile(m)
else:
    m.b.compile()
try:
    g = capture(m, (x,))
    print("captured; equal:", torch.allclose(run_graph(g, (x,)), m(x)))
except Exception as e:
    print("refused:", str(e)[:400])
