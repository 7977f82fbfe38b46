# session 18 (newuser18) probe, run from the repository root (commands in results.md)
import sys

import torch
import torch.nn as nn

sys.path.insert(0, ".")
from edge_server.testing import ServerThread
from tests import user_models18 as um
from tests.test_user_zoo_splits import FAST
from ue_client import CoinferClient, new_tenant
from ue_client.verify import max_abs_diff

srv = ServerThread(threads=1).start()


def case(name, fn):
    try:
        print("CASE", name, "->", fn(), flush=True)
    except Exception as e:
        print("CASE", name, "RAISED", type(e).__name__, str(e)[:300], flush=True)


def client(m, a, k=None, pos=0):
    if k is None:
        k = {}
    return CoinferClient(
        m,
        a,
        example_kwargs=k,
        server=srv.address,
        policy="offload",
        server_ops=pos,
        link=FAST,
        tenant=new_tenant(),
        profile_runs=2,
        fallback=False,
        probe=False,
    )


def eager(m, a, k=None):
    if k is None:
        k = {}
    with torch.no_grad():
        return m(*a, **k)


try:
    m, (z,), _ = um.complex_io()
    c = client(m, (z,))

    def conj_in():
        zc = z.conj()
        return zc.is_conj(), max_abs_diff(c(zc), eager(m, (zc,))), c.last_report.server_ops

    case("conj-bit complex input, full offload", conj_in)

    class CM(nn.Module):
        def forward(self, z):
            return (z * 2).real + 1, z.imag * 3

    cm = CM()
    c2 = client(cm, (z,))

    def conj2():
        zc = z.conj()
        return max_abs_diff(c2(zc), eager(cm, (zc,))), c2.last_report.server_ops

    case("conj-bit input, complex ops on server", conj2)

    class RM(nn.Module):
        def __init__(s):
            super().__init__()
            s.f = nn.Linear(4, 4)

        def forward(self, x):
            return self.f(x) * 2

    torch.manual_seed(0)
    rm = RM().eval()
    x = torch.randn(3, 4)
    c3 = client(rm, (x,))

    def neg_bit():
        zn = torch.randn(3, 4, dtype=torch.complex64).conj().imag  # a neg-bit view
        return zn.is_neg(), max_abs_diff(c3(zn), eager(rm, (zn,))), c3.last_report.server_ops

    case("neg-bit float input", neg_bit)

    def mutate():
        xx = x.clone()
        y1 = c3(xx)
        xx.add_(1.0)
        y2 = c3(xx)
        return max_abs_diff(y2, eager(rm, (xx,))), max_abs_diff(y1, y2) > 0

    case("input mutated in place between calls", mutate)

    def expanded():
        xe = torch.randn(1, 4).expand(3, 4)
        return max_abs_diff(c3(xe), eager(rm, (xe,))), c3(xe).stride(), eager(rm, (xe,)).stride()

    case("expanded input", expanded)

    def batch0():
        x0 = torch.empty(0, 4)
        y = c3(x0)
        e = eager(rm, (x0,))
        return y.shape, e.shape

    case("batch 0", batch0)

    def batch1():
        x1 = torch.randn(1, 4)
        y = c3(x1)
        e = eager(rm, (x1,))
        return max_abs_diff(y, e), y.shape

    case("batch 1", batch1)

    def np_in():
        import numpy as np

        xn = np.random.randn(3, 4).astype("float32")
        return max_abs_diff(c3(xn), eager(rm, (torch.from_numpy(xn),)))

    case("numpy input", np_in)

    def inf_tensor_input():
        with torch.inference_mode():
            xi = torch.randn(3, 4)
        return max_abs_diff(c3(xi), eager(rm, (xi,)))

    case("inference tensor input", inf_tensor_input)
finally:
    srv.stop()
