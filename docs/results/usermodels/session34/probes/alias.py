import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn


class Shared(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(6, 6)
        s.g = nn.Linear(6, 6)

    def forward(s, x):
        h = s.fc(x)
        h.relu_()
        z = s.g(h)
        return {
            "h": h,
            "flat": h.view(-1),
            "t": h.t(),
            "row0": h[0],
            "chunks": h.chunk(2, dim=1),
            "x": x,
            "xv": x[:, :2],
            "z": z,
            "zexp": z[:, :1].expand(-1, 4),
            "zd": z.diagonal(),
            "hu": h.unsqueeze(0),
            "zc": z.contiguous(),
        }


torch.manual_seed(0)
m = Shared().eval()
x0 = torch.randn(6, 6)
srv = harness.server()
try:
    for path, c in harness.clients(srv, m, (x0,), cuts={1, 2, 3, 4, 5}):
        with c:
            for rep in range(2):
                for key in ("h", "z", "x", "zc"):
                    xa, xb = x0.clone(), x0.clone()
                    with torch.no_grad():
                        g = c(xa)
                        w = m(xb)
                    g[key].mul_(2)
                    w[key].mul_(2)
                    p = harness.diff(g, w) + ([] if torch.equal(xa, xb) else ["input differs after write"])
                    if p:
                        print(path, rep, "write to", key, p[:3])
    print("done")
finally:
    srv.stop()
