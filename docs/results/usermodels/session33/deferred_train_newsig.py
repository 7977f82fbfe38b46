"""module.train() after a warm split request, then a call with another batch size: answered (and the user's module
silently put back in eval mode) where a call with the captured batch size, or any call before session 33, is refused."""

import torch
from common import client
from torch import nn

torch.manual_seed(0)
m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).eval()
x4, x3 = torch.randn(4, 16), torch.randn(3, 16)
with client(m, (x4,), k=3) as c, torch.no_grad():
    for _ in range(3):
        c(x4)
    print("warm split:", c.last_report.server_ops, "server ops")
    m.train()
    print("user set module.train(); m.training =", m.training)
    try:
        y = c(x3)
        print(
            "call with batch 3: ANSWERED; m.training is now",
            m.training,
            "; equals eval-mode eager:",
            torch.allclose(y, m.eval()(x3)),
        )
    except Exception as e:
        print("call with batch 3: refused", type(e).__name__, str(e)[:120])
