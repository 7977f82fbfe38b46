"""Numpy Generator draws reachable only through paths draw_sources does not walk: captured (not refused),
then the graph answers the traced draw while eager draws anew."""

import collections

import numpy as np
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.execute import run_graph


class Cfg:  # plain helper object; generator is a CLASS attribute of it
    rng = np.random.default_rng(0)


class Slots:  # __slots__ object, no __dict__
    __slots__ = ("rng",)

    def __init__(self):
        self.rng = np.random.default_rng(3)


class Helper(nn.Module):  # nn.Module kept in a plain list, used through a method (not called)
    def __init__(self):
        super().__init__()
        self.rng = np.random.default_rng(2)

    def noise(self, n):
        return self.rng.normal(size=n)


class A(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.cfg = Cfg()

    def forward(self, x):
        return self.fc(x) + (1.0 if self.cfg.rng.random() < 0.7 else -1.0)


class B(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.s = Slots()

    def forward(self, x):
        return self.fc(x) + (1.0 if self.s.rng.random() < 0.7 else -1.0)


class C(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.helpers = [Helper()]

    def forward(self, x):
        return self.fc(x) + (1.0 if self.helpers[0].noise(1)[0] < 0.5 else -1.0)


class D(nn.Module):  # generator past the 64 items of a list
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.table = [None] * 70 + [np.random.default_rng(3)]

    def forward(self, x):
        return self.fc(x) + (1.0 if self.table[-1].random() < 0.7 else -1.0)




class E(nn.Module):  # generator in a collections.deque
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.q = collections.deque([np.random.default_rng(3)])

    def forward(self, x):
        return self.fc(x) + (1.0 if self.q[0].random() < 0.7 else -1.0)


for M in (A, B, C, D, E):
    torch.manual_seed(0)
    m = M().eval()
    x = torch.randn(2, 4)
    try:
        g = capture(m, (x,))
    except Exception as e:
        print(M.__name__, "refused:", str(e)[:120])
        continue
    diffs = 0
    for _ in range(20):
        with torch.no_grad():
            e = m(x)
        diffs += not torch.allclose(run_graph(g, (x,)), e)
    print(M.__name__, "CAPTURED; graph differs from eager in", diffs, "of 20 calls")
