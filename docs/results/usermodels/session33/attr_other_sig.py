"""A Python attribute read only on another batch size's path: changed after that signature was captured."""

import torch
from common import client
from torch import nn

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.alpha = 1.0
        self.beta = 1.0
        self.small = {"gain": 1.0}

    def forward(self, x):
        h = self.lin(x)
        if x.shape[0] >= 4:
            return h * self.alpha
        return h * self.beta * self.small["gain"]


m = Net().eval()
x4, x2 = torch.randn(4, 8), torch.randn(2, 8)
for policy, k in (("local", None), ("offload", 1)):
    for change in ("beta", "gain"):
        m = Net().eval()
        with client(m, (x4,), k=k, policy=policy) as c, torch.no_grad():
            for xx in (x4, x2, x4, x2, x2):
                c(xx)
            if change == "beta":
                m.beta = 3.0
            else:
                m.small["gain"] = 3.0
            for xx in (x2, x4):
                try:
                    y = c(xx)
                    d = (y - m(xx)).abs().max().item()
                    print(
                        f"{policy} {change} changed, batch {xx.shape[0]}: answered |client-eager| = {d:.3g}"
                        f"{'  WRONG' if d > 1e-4 else ''}"
                    )
                except Exception as e:
                    print(f"{policy} {change} changed, batch {xx.shape[0]}: refused {type(e).__name__}: {str(e)[:80]}")
