"""F1 through the other ways a call is captured once more: a channels_last input and a call under CPU autocast.
Warm split; the user changes a Python attribute the forward reads; a call that needs a new capture is refused (after
capturing); the user sets the attribute back; that capture's graph keeps the changed value."""

import torch
from common import client
from torch import nn

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.gain = 1.0

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(h) * self.gain


x = torch.randn(2, 3, 8, 8)
for form in ("channels_last", "autocast"):
    m = Net().eval()
    with client(m, (x,), k=3) as c, torch.no_grad():
        for _ in range(3):
            c(x)
        call_x = x.contiguous(memory_format=torch.channels_last) if form == "channels_last" else x
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if form == "autocast" else torch.no_grad
        m.gain = 3.0
        try:
            with ctx():
                c(call_x)
            print(form, "changed: ANSWERED")
        except Exception as e:
            print(form, "changed: refused", type(e).__name__)
        m.gain = 1.0
        for i in range(2):
            with ctx():
                y = c(call_x)
                e = m(call_x)
            d = (y.float() - e.float()).abs().max().item()
            print(f"{form} undone call {i}: |client - eager| = {d:.3g}{'  WRONG' if d > 2e-2 else ''}")
