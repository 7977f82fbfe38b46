"""A split request whose output leaf the UE computes (before the cut or in a pinned tail) returns an inference tensor:
an in-place write into it outside inference_mode raises where eager's output takes it. README documents this for
local and fallen-back runs only; here the request ran split (server_ops > 0, no fallback)."""

import torch
from common import client
from torch import nn

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x).sigmoid()
        return h, self.b(h)  # h: made before the cut; self.b(h): on the server


m = Net().eval()
x = torch.randn(5, 6)
with client(m, (x,), k=2) as c, torch.no_grad():
    for _ in range(2):
        h, z = c(x)
    r = c.last_report
    print("ops:", [o.name for o in c.graph.ops])
    print(
        f"split: server_ops={r.server_ops} fallback={r.fallback}; h.is_inference()={h.is_inference()}, "
        f"z.is_inference()={z.is_inference()}; eager h.is_inference()={m(x)[0].is_inference()}"
    )
    for name, t in (("eager h", m(x)[0]), ("client h", h), ("client z", z)):
        try:
            t.mul_(2)
            print(f"{name}.mul_(2): ok")
        except RuntimeError as e:
            print(f"{name}.mul_(2): raises {str(e)[:70]}")
