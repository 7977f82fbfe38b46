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


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(6, 6)
        s.b = nn.Linear(6, 3)

    def forward(s, x):
        return s.b(torch.relu(s.a(x)))


x = torch.randn(4, 6)
try:

    def prune():
        import torch.nn.utils.prune as P

        torch.manual_seed(0)
        m = Net().eval()
        P.l1_unstructured(m.a, "weight", amount=0.5)
        c = client(m, (x,))
        r = [max_abs_diff(c(x), eager(m, (x,)))]
        P.l1_unstructured(m.a, "weight", amount=0.3)  # iterative pruning after capture
        try:
            r.append(max_abs_diff(c(x), eager(m, (x,))))
        except Exception as e:
            r.append(type(e).__name__ + ": " + str(e)[:150])
        return r

    case("prune", prune)

    def prune_remove():
        import torch.nn.utils.prune as P

        torch.manual_seed(0)
        m = Net().eval()
        P.l1_unstructured(m.a, "weight", amount=0.5)
        c = client(m, (x,))
        P.remove(m.a, "weight")
        try:
            return max_abs_diff(c(x), eager(m, (x,)))
        except Exception as e:
            return type(e).__name__ + ": " + str(e)[:150]

    case("prune.remove after capture", prune_remove)

    def bwd_hook():
        torch.manual_seed(0)
        m = Net().eval()
        m.a.register_full_backward_hook(lambda mod, gi, go: None)
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("full backward hook", bwd_hook)

    def always_call():
        torch.manual_seed(0)
        m = Net().eval()
        m.b.register_forward_hook(lambda mod, a, o: o * 2, always_call=True)
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("always_call hook", always_call)

    def old_wn():
        torch.manual_seed(0)
        m = Net().eval()
        nn.utils.weight_norm(m.a)
        c = client(m, (x,))
        r = [max_abs_diff(c(x), eager(m, (x,)))]
        with torch.no_grad():
            m.a.weight_g.mul_(2)
        try:
            r.append(max_abs_diff(c(x), eager(m, (x,))))
        except Exception as e:
            r.append(type(e).__name__ + ": " + str(e)[:150])
        return r

    case("old weight_norm + g changed", old_wn)

    def fuse():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        xi = torch.randn(1, 3, 6, 6)
        fm = torch.ao.quantization.fuse_modules(m, [["0", "1", "2"]])
        c = client(fm, (xi,))
        return max_abs_diff(c(xi), eager(fm, (xi,)))

    case("fuse_modules conv-bn-relu", fuse)

    def fwd_decorated():
        class D(Net):
            @torch.no_grad()
            def forward(s, x):
                return super().forward(x) * 2

        torch.manual_seed(0)
        m = D().eval()
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("@torch.no_grad() forward", fwd_decorated)

    def strs():
        class T(nn.Module):
            def __init__(s):
                super().__init__()
                s.e = nn.Embedding(30, 4)

            def forward(s, words: list[str]):
                ids = torch.tensor([[ord(ch) % 30 for ch in w[:3].ljust(3)] for w in words])
                return s.e(ids).mean(1)

        torch.manual_seed(0)
        m = T().eval()
        c = client(m, (["abc", "hello"],))
        return max_abs_diff(c(["xyz", "hi"]), eager(m, (["xyz", "hi"],)))

    case("string inputs tokenized in forward", strs)

    def deepcopy_module():
        import copy

        torch.manual_seed(0)
        m = Net().eval()
        c = client(m, (x,))
        m2 = copy.deepcopy(m)
        return max_abs_diff(c(x), eager(m2, (x,)))

    case("deepcopy", deepcopy_module)

    def to_double_after():
        torch.manual_seed(0)
        m = Net().eval()
        c = client(m, (x,))
        m.double()
        try:
            return max_abs_diff(c(x), eager(m, (x.double(),)))
        except Exception as e:
            return type(e).__name__ + ": " + str(e)[:150]

    case("module.double() after", to_double_after)

    def requires_grad_false():
        torch.manual_seed(0)
        m = Net().eval()
        c = client(m, (x,))
        m.requires_grad_(False)
        return max_abs_diff(c(x), eager(m, (x,)))

    case("requires_grad_(False) after capture", requires_grad_false)

    def bn_momentum_none_train():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6, track_running_stats=False)).eval()
        c = client(m, (x,))
        return max_abs_diff(c(x), eager(m, (x,)))

    case("BatchNorm track_running_stats=False (batch stats in eval)", bn_momentum_none_train)

    def inorm_stats():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True)).eval()
        xi = torch.randn(2, 3, 6, 6)
        c = client(m, (xi,))
        return max_abs_diff(c(xi), eager(m, (xi,)))

    case("InstanceNorm track_running_stats", inorm_stats)
finally:
    srv.stop()
