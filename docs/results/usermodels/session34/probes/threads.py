import sys
import threading

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn

from ue_client import CoinferClient


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(32, 64)
        s.head = nn.Linear(64, 5)

    def forward(s, x):
        h = torch.relu(s.fc(x))
        return {"logits": s.head(h), "feat": h}


torch.manual_seed(0)
m = Net().eval()
srv = harness.server()
try:
    for path, mk in [
        ("local", lambda x: CoinferClient(m, (x,))),
        ("all-server", lambda x: harness.remote(srv, m, (x,), None, fallback=False)),
        ("split1", lambda x: harness.remote(srv, m, (x,), 1, fallback=False)),
        ("auto-fallback", lambda x: harness.remote(srv, m, (x,), 2)),
    ]:
        x0 = torch.randn(4, 32)
        with mk(x0) as c:
            c(x0)
            bad = []
            errs = []

            def worker(t):
                g = torch.Generator().manual_seed(t)
                for i in range(6):
                    b = [1, 4, 7][(t + i) % 3]
                    x = torch.randn(b, 32, generator=g)
                    try:
                        with torch.no_grad():
                            y = c(x)
                            w = m(x)
                        p = harness.diff(y, w)
                        if p:
                            bad.append((t, i, b, p[:2]))  # noqa: B023
                    except Exception as e:
                        errs.append((t, i, b, f"{type(e).__name__}: {str(e)[:150]}"))  # noqa: B023

            ts = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
            [t.start() for t in ts]
            [t.join(120) for t in ts]
            print(path, "wrong:", len(bad), bad[:3], "errors:", len(errs), errs[:3])
finally:
    srv.stop()
