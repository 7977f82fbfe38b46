"""Forward draws that DrawWatch's exact random.Random path or its fixed generator list miss: captured, then the graph
answers the traced draw while eager draws anew."""

import concurrent.futures as cf
import functools
import random

import numpy as np
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.execute import run_graph


class PyRandom(random.Random):  # the Python docs' way to plug another generator into random.Random
    def seed(self, a=None, version=2):
        self.x = (a or 1) & 0x7FFFFFFF

    def random(self):
        self.x = (self.x * 6364136223846793005 + 1442695040888963407) % 2**64
        return (self.x >> 11) / 2**53

    def getstate(self):
        return self.x

    def setstate(self, s):
        self.x = s


class A(nn.Module):  # Random subclass with the draw in Python (no C call on the object)
    def __init__(self, seed):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rng = PyRandom(seed)

    def forward(self, x):
        return self.fc(x) * (1.0 if self.rng.random() < 0.5 else -1.0)


POOL = cf.ThreadPoolExecutor(2)


class B(nn.Module):  # the forward's draw runs on a worker thread (random's global generator)
    def __init__(self, seed):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        random.seed(seed)

    def forward(self, x):
        return self.fc(x) * (1.0 if POOL.submit(random.random).result() < 0.5 else -1.0)


@functools.lru_cache(None)
def _rng():
    return np.random.default_rng(SEED)


class C(nn.Module):  # lazily made generator (first call: inside capture), held by an lru_cache
    def __init__(self, seed):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        _rng.cache_clear()
        global SEED
        SEED = seed

    def forward(self, x):
        return self.fc(x) * (1.0 if _rng().random() < 0.5 else -1.0)


for M in (A, B, C):
    cap = wrong = 0
    msgs = set()
    for seed in range(1, 11):
        torch.manual_seed(0)
        m = M(seed).eval()
        x = torch.randn(2, 4)
        try:
            g = capture(m, (x,))
        except Exception as e:
            msgs.add(str(e)[:150])
            continue
        cap += 1
        with torch.no_grad():
            wrong += sum(
                not torch.allclose(
                    run_graph(g, (x,))[0] if isinstance(run_graph(g, (x,)), tuple) else run_graph(g, (x,)), m(x)
                )
                for _ in range(10)
            )
    print(f"{M.__name__}: captured {cap}/10 seeds; wrong calls {wrong}/{cap * 10}; refusals: {list(msgs)[:2]}")
