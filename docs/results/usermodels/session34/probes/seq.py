import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(16, 16)
        s.head = nn.Linear(16, 3)

    def forward(s, x, scale=None):
        h = torch.relu(s.fc(x))
        if scale is not None:
            h = h * scale
        return s.head(h)


changes = {
    ".data mul": lambda m: m.head.weight.data.mul_(2),
    "inplace no_grad": lambda m: torch.no_grad()(lambda: m.head.weight.mul_(2))(),
    "load_state_dict": lambda m: m.load_state_dict({k: v * 2 for k, v in m.state_dict().items()}),
    ".data small elem": lambda m: m.head.weight.data.__setitem__((1, 3), 5.0),
}
nexts = {
    "same": lambda x: ((x,), {}),
    "batch8": lambda x: ((torch.cat([x, x]),), {}),
    "kwarg form": lambda x: ((x,), {"scale": torch.tensor(1.0)}),
    "noncontig": lambda x: ((torch.cat([x, x], 1)[:, ::2],), {}),
}
srv = harness.server()
try:
    for cn, ch in changes.items():
        for nn_, nx in nexts.items():
            for path, ops in [("all-server", None), ("split1", 1), ("split2", 2)]:
                torch.manual_seed(0)
                m = Net().eval()
                x = torch.randn(4, 16)
                with harness.remote(srv, m, (x,), ops, fallback=False) as c:
                    c(x)
                    c(x)
                    ch(m)
                    outs = []
                    for i in range(2):  # noqa: B007
                        a, k = nx(x)
                        try:
                            with torch.no_grad():
                                got = c(*a, **k)
                                want = m(*a, **k)
                            d = (got - want).abs().max().item()
                            outs.append(f"diff={d:.3g}{' WRONG' if d > 1e-4 else ''}")
                        except Exception as e:
                            outs.append(f"{type(e).__name__}: {str(e)[:60]}")
                    print(f"{cn:16s} {nn_:10s} {path:10s} {outs}")
finally:
    srv.stop()
