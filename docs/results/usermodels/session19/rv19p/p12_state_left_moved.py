"""A refused capture leaves the user's generator advanced by every eager run capture made (the extra draw-check
forward among them), and a hook's per-call record grows by one more run where a generator is reachable."""

import numpy as np
import torch
from torch import nn

from ue_client import CoinferClient


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rng = np.random.default_rng(0)

    def forward(self, x):
        return self.fc(x) * (1.0 if self.rng.random() < 2.0 else -1.0)  # draws, result fixed


m = M().eval()
ref = np.random.default_rng(0)
try:
    CoinferClient(m, (torch.randn(2, 4),))
except Exception as e:
    print("refused:", str(e)[:80])
k = 0
while ref.bit_generator.state != m.rng.bit_generator.state and k < 100:
    ref.random()
    k += 1
print(f"the user's generator was advanced by {k} draws during the refused capture")

log = []


class H(nn.Module):
    def __init__(self, with_rng):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        if with_rng:
            self.aug_rng = np.random.default_rng(0)  # for training only
        self.fc.register_forward_hook(lambda mod, a, out: log.append(out.shape))

    def forward(self, x):
        return self.fc(x)


for with_rng in (False, True):
    log.clear()
    CoinferClient(H(with_rng).eval(), (torch.randn(2, 4),)).close()
    print(f"generator reachable={with_rng}: the user's hook ran {len(log)} times during capture")
