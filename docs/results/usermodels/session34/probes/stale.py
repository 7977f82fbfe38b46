import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 4, 3)
        s.e = nn.Embedding(10, 4)

    def forward(s, img, ids):
        return s.c(img).mean((2, 3)) + s.e(ids).sum(1)


torch.manual_seed(0)
m = Net().eval()
img, ids = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 5))
srv = harness.server()
try:
    for ops in (None, 2):
        with harness.remote(srv, m, (img, ids), ops, fallback=False) as c:
            c(img, ids)
            c(img, ids)
            seq = [
                ("good", ids),
                ("ids+10", ids + 10),
                ("ids-11", ids - 11),
                ("good", ids),
                ("good", ids),
                ("good", ids),
            ]
            for k, (name, i) in enumerate(seq):
                x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(k))
                try:
                    y = c(x, i)
                    with torch.no_grad():
                        w = m(x, i)
                    print(
                        ops,
                        name,
                        "answered, max|diff|",
                        (y - w).abs().max().item(),
                        c.last_report.server_ops,
                        c.last_report.fallback,
                    )
                except Exception as e:
                    print(ops, name, "raised", type(e).__name__, str(e)[:160])
finally:
    srv.stop()
