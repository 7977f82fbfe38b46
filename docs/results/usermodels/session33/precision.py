"""float32 matmul precision: eager vs client under the same setting, set before/after the client, changed between
calls; offload, a mid split, fallback=False; a separate server process."""

import torch
from common import client
from torch import nn

torch.manual_seed(0)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.ModuleList([nn.Linear(256, 256) for _ in range(4)])

    def forward(self, x):
        for lin in self.l:
            x = torch.tanh(lin(x)) + x
        return x @ x.T, torch.bmm(x.view(16, 4, 64), x.view(16, 64, 4))


def d(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


m = MLP().eval()
x = torch.randn(16, 256)
torch.set_float32_matmul_precision("highest")
with torch.no_grad():
    e_hi = m(x)
    torch.set_float32_matmul_precision("medium")
    e_med = m(x)
    torch.set_float32_matmul_precision("highest")
print(f"eager highest vs medium: {d(e_hi, e_med):.3g}")
for k in (0, 6, 12):
    with torch.no_grad():
        torch.set_float32_matmul_precision("highest")
        c = client(m, (x,), k=k)
        for seq in ["highest", "medium", "medium", "high", "highest", "medium"]:
            torch.set_float32_matmul_precision(seq)
            y = c(x)
            e = m(x)
            print(
                f"k={k} srv={c.last_report.server_ops} {seq:8s}: |client-eager| = {d(y, e):.3g}"
                f"{'  WRONG' if d(y, e) > 1e-3 else ''}"
            )
        c.close()
# set before the client
torch.set_float32_matmul_precision("medium")
with torch.no_grad():
    c = client(m, (x,), k=0)
    for seq in ("medium", "medium", "highest", "medium"):
        torch.set_float32_matmul_precision(seq)
        y, e = c(x), m(x)
        print(f"built under medium, k=0 {seq:8s}: |client-eager| = {d(y, e):.3g}{'  WRONG' if d(y, e) > 1e-3 else ''}")
    c.close()
torch.set_float32_matmul_precision("highest")
