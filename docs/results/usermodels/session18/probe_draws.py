# session 18 (newuser18) probe, run from the repository root (commands in results.md)
import random
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, ".")
from ue_client import CoinferClient
from ue_client.verify import max_abs_diff


def case(name, fn):
    try:
        print("CASE", name, "->", fn(), flush=True)
    except Exception as e:
        print("CASE", name, "RAISED", type(e).__name__, str(e)[:300], flush=True)


class TTA(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(4, 4)

    def forward(s, x):
        if random.random() < 0.1:
            x = x.flip(-1)
        return s.fc(x)


class NpNoise(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(4, 4)

    def forward(s, x):
        return s.fc(x) * float(np.random.uniform(1.0, 1.00001))


class NpGen(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(4, 4)
        s.rng = np.random.default_rng(0)

    def forward(s, x):
        return s.fc(x)[:, : 2 + int(s.rng.integers(0, 1))]


x = torch.randn(3, 4)
for M in (TTA, NpNoise, NpGen):

    def f(M=M):
        random.seed(3)  # 0.237..., 0.544...: the trace and the check both skip the flip
        m = M().eval()
        c = CoinferClient(m, (x,))
        outs = [max_abs_diff(c(x), m(x).detach()) for _ in range(30)]
        return max(outs)

    case(M.__name__, f)
