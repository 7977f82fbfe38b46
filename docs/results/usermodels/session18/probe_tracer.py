# session 18 (newuser18) probe, run from the repository root (commands in results.md)
import sys

import torch
import torch.nn as nn

sys.path.insert(0, ".")
from edge_server.testing import ServerThread
from tests.test_user_zoo_splits import FAST
from ue_client import CoinferClient, new_tenant
from ue_client.verify import max_abs_diff

srv = ServerThread(threads=1).start()


def case(name, fn):
    try:
        print("CASE", name, "->", fn(), flush=True)
    except Exception as e:
        print("CASE", name, "RAISED", type(e).__name__, str(e)[:400], flush=True)


def client(m, a, k=None, pos=1):
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


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(6, 6)
        s.b = nn.Linear(6, 3)

    def forward(s, x):
        return s.b(torch.relu(s.a(x)))


x = torch.randn(4, 6)
try:

    def build_in_inference():
        torch.manual_seed(0)
        m = Net().eval()
        with torch.inference_mode():
            c = client(m, (x,))
            y1 = c(x)
        y2 = c(x)
        with torch.no_grad():
            y3 = c(x)
        return [max_abs_diff(y, eager(m, (x,))) for y in (y1, y2, y3)], c.last_report.server_ops

    case("client built in inference_mode", build_in_inference)

    class Comp(Net):
        def forward(s, x):
            y = super().forward(x)
            return y * 2 if torch.compiler.is_compiling() else y

    def compiling():
        torch.manual_seed(0)
        m = Comp().eval()
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("is_compiling branch", compiling)

    class Exp(Net):
        def forward(s, x):
            y = super().forward(x)
            return y * 2 if torch.compiler.is_exporting() else y

    def exporting():
        torch.manual_seed(0)
        m = Exp().eval()
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("is_exporting branch", exporting)

    class Tr(Net):
        def forward(s, x):
            y = super().forward(x)
            return y * 2 if torch.jit.is_tracing() else y

    def tracing():
        torch.manual_seed(0)
        m = Tr().eval()
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("jit.is_tracing branch", tracing)

    class Fx(Net):
        def forward(s, x):
            y = super().forward(x)
            return y * 2 if torch.fx._symbolic_trace.is_fx_tracing() else y

    def fx():
        torch.manual_seed(0)
        m = Fx().eval()
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("is_fx_tracing branch", fx)

    class Fake(Net):
        def forward(s, x):
            y = super().forward(x)
            return y * 2 if isinstance(x, torch._subclasses.FakeTensor) else y

    def fake():
        torch.manual_seed(0)
        m = Fake().eval()
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("isinstance FakeTensor branch", fake)

    class Dev(Net):
        def forward(s, x):
            y = super().forward(x)
            return y * 2 if x.is_cpu else y

    def dev():
        torch.manual_seed(0)
        m = Dev().eval()
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("x.is_cpu branch", dev)

    class Thr(Net):
        def forward(s, x):
            y = super().forward(x)
            return y * torch.get_num_threads()

    def thr():
        torch.manual_seed(0)
        m = Thr().eval()
        c = client(m, (x,))
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return max_abs_diff(c(x), eager(m, (x,)))
        finally:
            torch.set_num_threads(n)

    case("torch.get_num_threads in forward, changed", thr)

    class DType(Net):
        def forward(s, x):
            return super().forward(x).to(torch.get_default_dtype())

    def ddt():
        torch.manual_seed(0)
        m = DType().eval()
        c = client(m, (x,))
        torch.set_default_dtype(torch.float64)
        try:
            return max_abs_diff(c(x), eager(m, (x,)))
        except Exception as e:
            return type(e).__name__ + " " + str(e)[:200]
        finally:
            torch.set_default_dtype(torch.float32)

    case("get_default_dtype read in forward, changed", ddt)
finally:
    srv.stop()
