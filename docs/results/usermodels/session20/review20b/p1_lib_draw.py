"""A draw a package torch requires makes on the forward's behalf, whose value reaches the output:
not refused (Drawn.lib, not public -> `continue` in DrawWatch.judge), captured, wrong on later calls."""

import random

import networkx as nx
import sympy
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.errors import CaptureError
from modelgraph.execute import run_graph


class Prime(nn.Module):  # sympy.randprime: sympy.core.random.rng, drawn from sympy/ntheory/generate.py
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * (1.0 if sympy.randprime(2, 10**6) % 4 == 1 else -1.0)


class RandGraph(nn.Module):  # a user's own random.Random handed to networkx (seed=rng), drawn in networkx code
    def __init__(self, seed):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.rng = random.Random(seed)

    def forward(self, x):
        g = nx.gnp_random_graph(8, 0.5, seed=self.rng)
        torch.tensor(nx.to_numpy_array(g), dtype=torch.float32)
        return self.fc(x) * (1.0 if g.number_of_edges() % 2 else -1.0)


class UserDraw(nn.Module):  # control: the same generator drawn by user code is refused
    def __init__(self, seed):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.rng = random.Random(seed)

    def forward(self, x):
        return self.fc(x) * self.rng.random()


for name, mk, d in [
    ("sympy.randprime", lambda s: Prime(), 4),
    ("networkx seed=rng", RandGraph, 8),
    ("user rng.random (control)", UserDraw, 8),
]:
    caught = wrong = 0
    for seed in range(1, 6):
        torch.manual_seed(seed)
        random.seed(seed)
        m = mk(seed).eval()
        x = torch.randn(2, d)
        try:
            g = capture(m, (x,))
        except CaptureError as e:
            caught += 1
            print("   ", str(e)[:160].replace(chr(10), " "))
            continue
        with torch.no_grad():
            wrong += sum(not torch.allclose(run_graph(g, (x,)), m(x), atol=1e-5) for _ in range(10))
    print(f"{name}: refused {caught}/5, captured {5 - caught}/5, wrong calls {wrong}/{(5 - caught) * 10}")
