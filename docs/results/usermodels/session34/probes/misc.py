import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
import torch.nn.modules.module as MM
from torch import nn

from ue_client import CoinferClient


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(8, 8)
        s.head = nn.Linear(8, 3)

    def forward(s, x):
        return s.head(torch.relu(s.fc(x)))


srv = harness.server()
try:
    for path, mk in (
        ("local", lambda m, x: CoinferClient(m, (x,))),
        ("all-server", lambda m, x: harness.remote(srv, m, (x,), None, fallback=False)),
    ):
        torch.manual_seed(0)
        m = Net().eval()
        x = torch.randn(4, 8)
        with mk(m, x) as c:
            c(x)
            h = MM.register_module_forward_hook(lambda mod, i, o: o * 2 if isinstance(mod, nn.Linear) else o)
            try:
                try:
                    with torch.no_grad():
                        y = c(x)
                        w = m(x)
                    print(
                        path, "global forward hook added after capture: answered max|diff|", (y - w).abs().max().item()
                    )
                except Exception as e:
                    print(path, "global hook: raised", type(e).__name__, str(e)[:200])
            finally:
                h.remove()
        # global hook present at capture time and removed afterwards
        torch.manual_seed(0)
        m = Net().eval()
        h = MM.register_module_forward_pre_hook(lambda mod, i: (i[0] * 3,) if isinstance(mod, nn.Linear) else None)
        try:
            c = mk(m, x)
            c(x)
        finally:
            h.remove()
        with c:
            try:
                with torch.no_grad():
                    y = c(x)
                    w = m(x)
                print(path, "global pre-hook at capture, removed after: answered max|diff|", (y - w).abs().max().item())
            except Exception as e:
                print(path, "global pre-hook removed: raised", type(e).__name__, str(e)[:200])
    torch.manual_seed(0)
    m = Net().eval()
    try:
        cm = torch.compile(m)
        c = CoinferClient(cm, (x,))
        with torch.no_grad():
            print("torch.compile module: max|diff|", (c(x) - m(x)).abs().max().item())
    except Exception as e:
        print("torch.compile module: raised", type(e).__name__, str(e)[:300])
finally:
    srv.stop()
