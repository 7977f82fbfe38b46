"""The deferred weight check: changes between warm split calls, from another thread during a call, under auto,
two clients of one module, load_state_dict, train(), attributes. Prints refused / answered and |client - eager|."""

import threading
import time

import torch
from common import client
from torch import nn

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 256)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(256, 8)
        self.scale = 1.0

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x)))) * self.scale


def outcome(c, m, x, label):
    try:
        y = c(x)
    except Exception as e:
        print(f"{label}: refused {type(e).__name__}: {str(e)[:90]}")
        return
    with torch.no_grad():
        e = m(x)
    d = (y - e).abs().max().item()
    print(
        f"{label}: answered, |client - eager| = {d:.3g} srv={c.last_report.server_ops} "
        f"fallback={c.last_report.fallback}{'  WRONG' if d > 1e-4 else ''}"
    )


CHANGES = {
    "data one element (large W)": lambda m: m.a.weight.data.__setitem__((200, 63), 9.0),
    "data in place add": lambda m: m.b.bias.data.add_(1.0),
    "load_state_dict": lambda m: m.load_state_dict({k: v + 0.01 for k, v in m.state_dict().items()}),
    "train()": lambda m: m.train(),
    "python attr": lambda m: setattr(m, "scale", 2.0),
    "replace param": lambda m: setattr(m.b, "bias", nn.Parameter(torch.ones(8))),
    "numpy write": lambda m: m.b.weight.detach().numpy().__setitem__((3, 5), 7.0),
}

x = torch.randn(8, 64)
for name, change in CHANGES.items():
    m = Net().eval()
    with client(m, (x,), k=2) as c, torch.no_grad():
        for _ in range(3):
            c(x)
        change(m)
        outcome(c, m, x, f"warm split then {name}")
        outcome(c, m, x, "   again")

# two clients of one module
m = Net().eval()
with client(m, (x,), k=2) as c1, client(m, (x,), k=3) as c2, torch.no_grad():
    for _ in range(3):
        c1(x), c2(x)
    m.b.bias.data.add_(1.0)
    outcome(c1, m, x, "two clients, c1 after .data")
    outcome(c2, m, x, "two clients, c2 after .data")

# auto policy
m = Net().eval()
with client(m, (x,), policy="auto") as c, torch.no_grad():
    for _ in range(6):
        c(x)
    print("auto reports:", [(r.server_ops, r.fallback) for r in c.reports])
    m.b.bias.data.add_(1.0)
    outcome(c, m, x, "auto then .data")

# change from another thread during warm split calls: each answer must equal eager before or after the change
m = Net().eval()
big = torch.randn(64, 64)
with client(m, (x,), k=2) as c, torch.no_grad():
    for _ in range(3):
        c(x)
    before = m(x)
    results = []

    def caller():
        for _ in range(20):
            try:
                results.append(("ok", c(x)))
            except Exception as e:
                results.append(("err", type(e).__name__))

    t = threading.Thread(target=caller)
    t.start()
    time.sleep(0.05)
    m.b.weight.data.mul_(1.5)
    t.join()
    after = m(x)
    kinds = []
    for kind, v in results:
        if kind == "err":
            kinds.append(v)
        else:
            db, da = (v - before).abs().max().item(), (v - after).abs().max().item()
            kinds.append("before" if db < 1e-5 else "after" if da < 1e-5 else f"NEITHER({db:.3g},{da:.3g})")
    print("thread change during calls:", kinds)
