# session 18 (newuser18) probe, run from the repository root (commands in results.md)
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, ".")
from ue_client import CoinferClient


def eager(m, a, k=None):
    if k is None:
        k = {}
    with torch.no_grad():
        return m(*a, **k)


def maxd(a, b):
    from ue_client.verify import max_abs_diff

    return max_abs_diff(a, b)


def case(name, fn):
    try:
        r = fn()
        print("CASE", name, "->", r, flush=True)
    except Exception as e:
        print("CASE", name, "RAISED", type(e).__name__, str(e)[:400].replace("\n", " | "), flush=True)


class Small(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(4, 4)
        s.b = nn.Linear(4, 2)

    def forward(s, x):
        return s.b(torch.relu(s.a(x)))


x = torch.randn(3, 4)


def hook_after():
    torch.manual_seed(0)
    m = Small().eval()
    c = CoinferClient(m, (x,))
    m.a.register_forward_hook(lambda mod, a, o: o * 10)
    return maxd(c(x), eager(m, (x,)))


case("hook added after capture", hook_after)


def hook_removed():
    torch.manual_seed(0)
    m = Small().eval()
    h = m.a.register_forward_hook(lambda mod, a, o: o * 10)
    c = CoinferClient(m, (x,))
    h.remove()
    return maxd(c(x), eager(m, (x,)))


case("hook removed after capture", hook_removed)


def global_hook_after():
    torch.manual_seed(0)
    m = Small().eval()
    c = CoinferClient(m, (x,))
    h = nn.modules.module.register_module_forward_hook(lambda mod, a, o: o * 10 if isinstance(mod, nn.Linear) else None)
    try:
        return maxd(c(x), eager(m, (x,)))
    finally:
        h.remove()


case("global hook added after capture", global_hook_after)


class PlainT(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(4, 4)
        s.scale = torch.tensor([2.0])

    def forward(s, x):
        return s.a(x) * s.scale


def plain_tensor_inplace():
    torch.manual_seed(0)
    m = PlainT().eval()
    c = CoinferClient(m, (x,))
    m.scale.mul_(3)
    return maxd(c(x), eager(m, (x,)))


case("plain tensor attr changed in place after capture", plain_tensor_inplace)


def lazy():
    torch.manual_seed(0)
    m = nn.Sequential(nn.LazyLinear(3), nn.ReLU()).eval()
    c = CoinferClient(m, (x,))
    return maxd(c(x), eager(m, (x,)))


case("LazyLinear uninitialized", lazy)


def compiled():
    torch.manual_seed(0)
    m = Small().eval()
    cm = torch.compile(m)
    c = CoinferClient(cm, (x,))
    return maxd(c(x), eager(m, (x,)))


case("torch.compile'd", compiled)


def dp():
    torch.manual_seed(0)
    m = Small().eval()
    c = CoinferClient(nn.DataParallel(m), (x,))
    return maxd(c(x), eager(m, (x,)))


case("DataParallel", dp)


def qdyn():
    torch.manual_seed(0)
    m = Small().eval()
    q = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    c = CoinferClient(q, (x,))
    return maxd(c(x), eager(q, (x,)))


case("quantize_dynamic", qdyn)


class Ckpt(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = Small()

    def forward(s, x):
        return torch.utils.checkpoint.checkpoint(s.a, x, use_reentrant=False)


def ckpt():
    torch.manual_seed(0)
    m = Ckpt().eval()
    c = CoinferClient(m, (x,))
    return maxd(c(x), eager(m, (x,)))


case("checkpoint in forward", ckpt)


class EB(nn.Module):
    def __init__(s):
        super().__init__()
        s.e = nn.EmbeddingBag(20, 4, mode="mean")
        s.f = nn.Linear(4, 2)

    def forward(s, ids, off):
        return s.f(s.e(ids, off))


def eb():
    torch.manual_seed(0)
    m = EB().eval()
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    off = torch.tensor([0, 3, 5])
    c = CoinferClient(m, (ids, off))
    r = [maxd(c(ids, off), eager(m, (ids, off)))]
    off2 = torch.tensor([0, 1, 6])
    r.append(maxd(c(ids, off2), eager(m, (ids, off2))))
    return r


case("EmbeddingBag offsets", eb)


def fxgm():
    torch.manual_seed(0)
    m = Small().eval()
    gm = torch.fx.symbolic_trace(m)
    c = CoinferClient(gm, (x,))
    return maxd(c(x), eager(m, (x,)))


case("fx GraphModule", fxgm)


class FD(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(4, 4)

    def forward(s, x):
        return F.dropout(s.a(x), 0.1)


def fdrop():
    torch.manual_seed(0)
    m = FD().eval()
    c = CoinferClient(m, (x,))
    return maxd(c(x), eager(m, (x,)))


case("F.dropout default training", fdrop)


class GradBranch(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(4, 4)

    def forward(s, x):
        return s.a(x) * 2 if torch.is_grad_enabled() else s.a(x) * 3


def gradb():
    torch.manual_seed(0)
    m = GradBranch().eval()
    c = CoinferClient(m, (x,))
    y1 = c(x)
    e1 = m(x)
    with torch.no_grad():
        y2 = c(x)
        e2 = m(x)
    return maxd(y1, e1.detach()), maxd(y2, e2)


case("is_grad_enabled branch", gradb)


class InfBranch(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(4, 4)

    def forward(s, x):
        return s.a(x) * 2 if torch.is_inference_mode_enabled() else s.a(x) * 3


def infb():
    torch.manual_seed(0)
    m = InfBranch().eval()
    c = CoinferClient(m, (x,))
    with torch.inference_mode():
        y2 = c(x)
        e2 = m(x)
    y1 = c(x)
    e1 = m(x)
    return maxd(y1, e1.detach()), maxd(y2, e2)


case("is_inference_mode branch", infb)


class ReqGrad(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(4, 4)

    def forward(s, x):
        return s.a(x) * 2 if x.requires_grad else s.a(x) * 3


def rg():
    torch.manual_seed(0)
    m = ReqGrad().eval()
    c = CoinferClient(m, (x,))
    xr = x.clone().requires_grad_()
    return maxd(c(xr), m(xr).detach()), maxd(c(x), eager(m, (x,)))


case("requires_grad branch", rg)
SCALE = [2.0]


class GlobalK(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(4, 4)

    def forward(s, x):
        return s.a(x) * SCALE[0]


def glob():
    torch.manual_seed(0)
    m = GlobalK().eval()
    c = CoinferClient(m, (x,))
    SCALE[0] = 5.0
    try:
        return maxd(c(x), eager(m, (x,)))
    finally:
        SCALE[0] = 2.0


case("module-level global changed after capture", glob)


def int_out_batch():
    from tests import user_models18 as um

    m, a, _k = um.int_keys_out()
    c = CoinferClient(m, a)
    x2 = torch.randn(5, 4)
    y = c(x2)
    e = eager(m, (x2,))
    return y[3], e[3], maxd(y[0], e[0])


case("int const output other batch", int_out_batch)


def route_other():
    from tests import user_models18 as um

    m, a, k = um.moduledict_route()
    c = CoinferClient(m, a, example_kwargs=k)
    y = c(*a, task="cls")
    e = eager(m, a, {"task": "cls"})
    return y.shape, e.shape, maxd(y, e)


case("moduledict other route", route_other)


def spectral_train():
    from tests import user_models18 as um

    m, a, _k = um.parametrized_spectral()
    c = CoinferClient(m, a)
    m.train()
    with torch.no_grad():
        m(*a)
    m.eval()
    return maxd(c(*a), eager(m, a))


case("spectral_norm stepped in train after capture", spectral_train)


def param_orig_changed():
    from tests import user_models18 as um

    m, a, _k = um.parametrized_spectral()
    c = CoinferClient(m, a)
    with torch.no_grad():
        m.sym.parametrizations.weight.original.mul_(2)
    return maxd(c(*a), eager(m, a))


case("parametrization original changed", param_orig_changed)


def gradb_nograd_capture():
    torch.manual_seed(0)
    m = GradBranch().eval()
    with torch.no_grad():
        c = CoinferClient(m, (x,))
    y1 = c(x)
    e1 = m(x)
    with torch.no_grad():
        y2 = c(x)
        e2 = m(x)
    return maxd(y1, e1.detach()), maxd(y2, e2)


case("is_grad_enabled branch, captured under no_grad", gradb_nograd_capture)
