"""gc.freeze() (a pre-forking server's usual step after building the model): the generator lives in the permanent
generation, so live_rngs() does not see it; one held where draw_sources does not walk (rv19 p1's deque / class
attribute of a helper) is captured again while every call draws anew."""

import collections
import gc

import numpy as np
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.execute import run_graph


class Cfg:
    rng = np.random.default_rng(0)


class A(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.cfg = Cfg()

    def forward(self, x):
        return self.fc(x) * (1.0 if self.cfg.rng.random() < 0.5 else -1.0)


class B(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.q = collections.deque([np.random.default_rng(seed)])

    def forward(self, x):
        return self.fc(x) * (1.0 if self.q[0].random() < 0.5 else -1.0)


for freeze in (False, True):
    cap = wrong = 0
    for seed in range(10):
        Cfg.rng = np.random.default_rng(seed)
        for M in (A, lambda seed=seed: B(seed)):
            torch.manual_seed(0)
            m = M().eval()
            x = torch.randn(2, 4)
            if freeze:
                gc.freeze()
            n0 = gc.get_freeze_count()
            try:
                g = capture(m, (x,))
            except Exception:
                continue
            finally:
                if freeze:
                    gc.unfreeze()
            cap += 1
            with torch.no_grad():
                wrong += sum(not torch.allclose(run_graph(g, (x,)), m(x)) for _ in range(10))
    print(f"gc.freeze {freeze}: captured {cap}/20, wrong calls {wrong}/{cap * 10}")
