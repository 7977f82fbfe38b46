import sys
import types

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn

from ue_client import CoinferClient

CFG = {"temp": 1.0}


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(8, 8)
        s.act = nn.ReLU()
        s.head = nn.Linear(8, 3)
        s.cfg = types.SimpleNamespace(scale=1.0)
        s.drop = nn.Dropout(0.0)

    def forward(s, x):
        return s.head(s.drop(s.act(s.fc(x)))) * s.cfg.scale / CFG["temp"]


def scenario(name, change, restore=None):
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
                    print(f"{name:28s} {path:10s} raised {type(e).__name__}: {str(e)[:150]}")
    finally:
        srv.stop()


scenario("global dict", lambda m: CFG.__setitem__("temp", 2.0))
CFG["temp"] = 1.0
scenario("namespace attr", lambda m: setattr(m.cfg, "scale", 3.0))
scenario("swap act module", lambda m: setattr(m, "act", nn.GELU()))
scenario("act inplace flag", lambda m: setattr(m.act, "inplace", True))
scenario("dropout p + train", lambda m: (setattr(m.drop, "p", 0.5), m.train()))
scenario("forward hook added", lambda m: m.fc.register_forward_hook(lambda mod, i, o: o * 2))
scenario("pre hook added", lambda m: m.register_forward_pre_hook(lambda mod, i: (i[0] * 2,)))
scenario("load_state_dict", lambda m: m.load_state_dict({k: v * 0 + 0.1 for k, v in m.state_dict().items()}))


def opt(m):
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(4, 8)).sum().backward()
    o.step()


scenario("optimizer step", opt)
scenario("requires_grad flip", lambda m: m.requires_grad_(False))


def prune(m):
    import torch.nn.utils.prune as P

    P.l1_unstructured(m.fc, "weight", amount=0.5)


scenario("prune after", prune)
scenario("half precision", lambda m: m.half())
scenario("swap forward", lambda m: setattr(m, "forward", lambda x: x[:, :3]))
