"""p1's model A through the user's API (CoinferClient, no server: the local path runs the captured graph)."""

import numpy as np
import torch
from torch import nn

from ue_client import CoinferClient


class Cfg:
    rng = np.random.default_rng(0)


class A(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.cfg = Cfg()

    def forward(self, x):
        return self.fc(x) + (1.0 if self.cfg.rng.random() < 0.7 else -1.0)


torch.manual_seed(0)
m = A().eval()
x = torch.randn(2, 4)
c = CoinferClient(m, (x,))
diff = 0
for _ in range(20):
    got = c(x)
    with torch.no_grad():
        e = m(x)
    diff += not torch.allclose(got, e)
print("CoinferClient(m) vs m(x): differ in", diff, "of 20 calls")
