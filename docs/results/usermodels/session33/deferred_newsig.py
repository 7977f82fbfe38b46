"""A change made after a warm split request, then a call with another batch size: the new signature is captured
from the changed module before the deferred check refuses; after the user undoes the change, that graph answers."""

import sys

import torch
from common import client
from torch import nn

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.temperature = 2.0

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) / self.temperature


def main(kind, fallback=False):
    m = Net().eval()
    x4, x3 = torch.randn(4, 8), torch.randn(3, 8)
    c = client(m, (x4,), k=2, fallback=fallback)
    with torch.no_grad():
        for _ in range(3):
            c(x4)
        print(
            "warm split:",
            c.last_report.server_ops,
            "server ops, fallback",
            c.last_report.fallback,
            "engine warm_split",
            getattr(c.engine, "warm_split", "n/a"),
        )
        # the user changes the module
        if kind == "attr":
            m.temperature = 5.0
        elif kind == "replace":
            old = m.a.weight
            m.a.weight = nn.Parameter(torch.randn_like(old))
        elif kind == "train":
            m.train()
        elif kind == "data":
            saved = m.a.weight.detach().clone()
            m.a.weight.data.mul_(3.0)
        elif kind == "lsd":
            saved = {k: v.clone() for k, v in m.state_dict().items()}
            m.load_state_dict({k: v * 2 for k, v in saved.items()})
        try:
            c(x3)
            print("changed module, new batch size: ANSWERED (expected InputError)")
        except Exception as e:
            print("changed module, new batch size: refused", type(e).__name__, str(e)[:100])
        # the user undoes the change
        if kind == "attr":
            m.temperature = 2.0
        elif kind == "replace":
            m.a.weight = old
        elif kind == "train":
            m.eval()
        elif kind == "data":
            m.a.weight.data.copy_(saved)
        for xx in (x4, x3, x3):
            try:
                got = c(xx)
            except Exception as e:
                print(f"undone, batch {xx.shape[0]}: raised {type(e).__name__}: {str(e)[:100]}")
                continue
            want = m(xx)
            d = (got - want).abs().max().item()
            print(
                f"undone, batch {xx.shape[0]}: max|client - eager| = {d:.4g} "
                f"({'WRONG' if d > 1e-4 else 'ok'}) server_ops={c.last_report.server_ops}"
            )
    c.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "attr")
