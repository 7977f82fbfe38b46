"""Outputs whose elements overlap in memory (unfold's sliding windows, an as_strided with stride 1 along two dims),
alone or beside their base, through a split and offload."""

import torch
from common import client, compare
from torch import nn

torch.manual_seed(0)


class Unfold(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x).relu()
        return h.unfold(0, 3, 1)  # sliding windows over the batch: overlapping views


class UnfoldBoth(Unfold):
    def forward(self, x):
        h = self.lin(x).relu()
        return h, h.unfold(1, 4, 2), h.as_strided((3, 3), (1, 1))


class ExpandAlone(Unfold):
    def forward(self, x):
        h = self.lin(x).relu().sum(0, keepdim=True)
        return h.expand(4, 8), h.expand(2, 8).T


for M in (Unfold, UnfoldBoth, ExpandAlone):
    m = M().eval()
    x = torch.randn(6, 8)
    base = client(m, (x,), k=0)
    n = len(base.graph.ops)
    base.close()
    for k in range(0, n + 1):
        try:
            with client(m, (x,), k=k) as c, torch.no_grad():
                for i in range(2):
                    y = c(x)
                    compare(
                        f"{M.__name__} k={k}/{n} call {i} srv={c.last_report.server_ops}",
                        y,
                        m(x),
                        (x,),
                        list(m.parameters()),
                    )
        except Exception as e:
            print(f"FAIL {M.__name__} k={k}/{n}: raised {type(e).__name__}: {str(e)[:150]}")
