import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import contextlib

import harness
import torch
from torch import nn

from ue_client import CoinferClient


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(64, 64)
        s.head = nn.Linear(64, 3)

    def forward(s, x):
        pos = (torch.arange(x.shape[1]) * 0.01).to(x.dtype)
        h = torch.relu(s.fc(x + pos))
        return s.head(h), torch.zeros(2)


ctxs = {
    "default dtype f64": None,
    "matmul precision medium": None,
}


@contextlib.contextmanager
def default64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def prec():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


ctxs["default dtype f64"] = default64
ctxs["matmul precision medium"] = prec
srv = harness.server()
try:
    for cname, ctx in ctxs.items():
        for path, mk in [
            ("local", lambda m, x: CoinferClient(m, (x,))),
            ("all-server", lambda m, x: harness.remote(srv, m, (x,), None, fallback=False)),
            ("split2", lambda m, x: harness.remote(srv, m, (x,), 2, fallback=False)),
        ]:
            torch.manual_seed(0)
            m = Net().eval()
            x = torch.randn(4, 64)
            with mk(m, x) as c:
                c(x)
                for rep in range(2):
                    with torch.no_grad(), ctx():
                        try:
                            got = c(x)
                        except Exception as e:
                            got = e
                        want = m(x)
                    if isinstance(got, Exception):
                        print(f"{cname:24s} {path:10s} raised {type(got).__name__}: {str(got)[:200]}")
                        continue
                    p = harness.diff(got, want)
                    print(f"{cname:24s} {path:10s} rep{rep} {'ok' if not p else p}")  # noqa: SIM212
finally:
    srv.stop()
