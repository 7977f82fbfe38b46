"""A frozen model (requires_grad_(False) before the client is built, nothing changed after) called with grad enabled
on an input that requires grad: eager's MHA leaves its fused path (an input requires grad), the client answers the
fused path's strides."""

import torch
from common import client, compare
from torch import nn

torch.manual_seed(0)
m = nn.MultiheadAttention(8, 2, batch_first=True).eval().requires_grad_(False)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x, x, x, need_weights=False)[0]


a = Attn().eval()
x = torch.randn(2, 5, 8)
for k in (2, 0):
    with client(a, (x,), k=k) as c:
        xr = x.clone().requires_grad_(True)
        got, want = c(xr), a(xr)
        compare(f"frozen model, grad on, input requires grad, k={k} srv={c.last_report.server_ops}", got, want)
        for name, t in (("eager", want), ("client", got)):
            try:
                t.view(10, 8)
                print(f"   {name}: y.view(10, 8) ok")
            except RuntimeError as e:
                print(f"   {name}: y.view(10, 8) raises {str(e)[:60]}")
