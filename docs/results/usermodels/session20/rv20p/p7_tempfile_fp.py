"""A deterministic forward that saves a debug copy of an activation through tempfile (names drawn from tempfile's
own random.Random): refused as 'draws random numbers in Python'."""

import tempfile

import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.execute import run_graph


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        with tempfile.NamedTemporaryFile() as f:  # a debug dump
            f.write(b"x")
        return y


torch.manual_seed(0)
m = M().eval()
x = torch.randn(2, 4)
try:
    g = capture(m, (x,))
    print("captured; equal:", torch.allclose(run_graph(g, (x,)), m(x)))
except Exception as e:
    print("refused:", str(e)[:300])
