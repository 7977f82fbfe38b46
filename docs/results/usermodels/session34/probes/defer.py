import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(16, 16)
        s.e = nn.Embedding(10, 16)
        s.head = nn.Linear(16, 3)

    def forward(s, x, ids):
        return s.head(torch.relu(s.fc(x)) + s.e(ids))


def run(name, ops, fallback, between, stop_server=False):
    srv = harness.server()
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(4, 16)
    ids = torch.randint(0, 10, (4,))
    c = harness.remote(srv, m, (x, ids), ops, fallback=fallback, timeout_ms=5000)
    out = []
    with c:
        c(x, ids)
        c(x, ids)
        if stop_server:
            srv.stop()
        between(m)
        for call in [(x, ids + 10), (x, ids), (x, ids), (torch.cat([x, x]), torch.cat([ids, ids]))]:
            try:
                y = c(*call)
                with torch.no_grad():
                    w = m(*call)
                out.append(f"answered d={(y - w).abs().max().item():.2g} fb={c.last_report.fallback}")
            except Exception as e:
                out.append(f"{type(e).__name__}:{str(e)[:50]}")
    if not stop_server:
        srv.stop()
    print(name, out)


for ops in (None, 2):
    for fb in (True, False):
        run(f"ops={ops} fb={fb} .data change", ops, fb, lambda m: m.head.weight.data.mul_(2))
        run(f"ops={ops} fb={fb} .data change+server stopped", ops, fb, lambda m: m.head.weight.data.mul_(2), True)
        run(f"ops={ops} fb={fb} emb .data change", ops, fb, lambda m: m.e.weight.data[3].zero_())
