import functools
import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
import torch.nn.functional as F
from torch import nn

from ue_client import CoinferClient

CFG = {"temp": 1.0}
TEMP = 1.0
GMASK = torch.ones(8)


class Net(nn.Module):
    bias_c = 0.0

    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(8, 8)
        s.head = nn.Linear(8, 3)
        s.alpha = 1.0
        s.act = functools.partial(F.leaky_relu, negative_slope=0.1)
        s.tlist = [torch.ones(8)]
        s.register_buffer("rb", torch.ones(8))

    def forward(s, x):
        h = s.act(s.fc(x)) * GMASK * s.tlist[0] * s.rb
        return s.head(h) / CFG["temp"] / TEMP + Net.bias_c + s.alpha


def scenario(name, change, restore):
    srv = harness.server()
    try:
        for path, mk in [
            ("local", lambda m, x: CoinferClient(m, (x,))),
            ("all-server", lambda m, x: harness.remote(srv, m, (x,), None, fallback=False)),
            ("split2", lambda m, x: harness.remote(srv, m, (x,), 2, fallback=False)),
        ]:
            torch.manual_seed(0)
            m = Net().eval()
            x = torch.randn(4, 8)
            with mk(m, x) as c:
                c(x)
                c(x)
                change(m)
                try:
                    with torch.no_grad():
                        got = c(x)
                        want = m(x)
                    d = (got - want).abs().max().item()
                    print(f"{name:28s} {path:10s} answered max|diff|={d:.3g} {'WRONG' if d > 1e-4 else 'ok'}")
                except Exception as e:
                    print(f"{name:28s} {path:10s} raised {type(e).__name__}: {str(e)[:120]}")
            restore(m)
    finally:
        srv.stop()


g = globals()
scenario("global dict", lambda m: CFG.__setitem__("temp", 2.0), lambda m: CFG.__setitem__("temp", 1.0))
scenario("global float", lambda m: g.__setitem__("TEMP", 2.0), lambda m: g.__setitem__("TEMP", 1.0))
scenario("global tensor inplace", lambda m: GMASK.mul_(2), lambda m: GMASK.fill_(1))
scenario("global tensor .data", lambda m: GMASK.data.mul_(2), lambda m: GMASK.fill_(1))
scenario("class attr", lambda m: setattr(Net, "bias_c", 5.0), lambda m: setattr(Net, "bias_c", 0.0))
scenario("partial kw", lambda m: setattr(m, "act", functools.partial(F.leaky_relu, negative_slope=0.5)), lambda m: None)
scenario("partial keywords mutate", lambda m: m.act.keywords.__setitem__("negative_slope", 0.5), lambda m: None)
scenario("tensor in list inplace", lambda m: m.tlist[0].mul_(3), lambda m: None)
scenario("buffer .data", lambda m: m.rb.data.mul_(3), lambda m: None)
scenario("buffer replaced", lambda m: setattr(m, "rb", torch.full((8,), 2.0)), lambda m: None)
scenario("float attr", lambda m: setattr(m, "alpha", 2.0), lambda m: None)
scenario("set_grad_enabled? none", lambda m: None, lambda m: None)
