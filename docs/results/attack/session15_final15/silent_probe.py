# ruff: noqa  (a results script, kept as it ran)
import functools, sys, traceback
import torch
from torch import nn
import torch.nn.functional as F
from edge_server.testing import ServerThread
from ue_client import CoinferClient, new_tenant, InputError
from ue_client.verify import max_abs_diff
from tests.checks import FAST_LINK

def seeded(m, s=3):
    g = torch.Generator().manual_seed(s)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()

cases = {}
def case(f): cases[f.__name__] = f; return f

@case
def partial_attr():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.act = functools.partial(F.leaky_relu, negative_slope=0.1)
        def forward(s, x): return s.act(s.fc(x) - 1)
    m = M()
    def change(): m.act = functools.partial(F.leaky_relu, negative_slope=0.9)
    return m, change

@case
def lambda_attr():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.f = lambda t: t * 2
        def forward(s, x): return s.f(s.fc(x))
    m = M()
    def change(): m.f = lambda t: t * 3
    return m, change

@case
def hook_closure():
    m = nn.Sequential(nn.Linear(6, 6))
    box = [1.0]
    m.register_forward_hook(lambda mod, i, o: o * box[0])
    def change(): box[0] = 2.0
    return m, change

@case
def type_self_attr():
    class M(nn.Module):
        k = 1.0
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6)
        def forward(s, x): return s.fc(x) * type(s).k
    m = M()
    def change(): M.k = 2.0
    return m, change

@case
def re_register_buffer():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.register_buffer("b", torch.ones(6))
        def forward(s, x): return s.fc(x) + s.b
    m = M()
    def change(): m.register_buffer("b", torch.full((6,), 5.0))
    return m, change

@case
def buffer_set_attr():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.register_buffer("b", torch.ones(6))
        def forward(s, x): return s.fc(x) + s.b
    m = M()
    def change(): m.b = torch.full((6,), 5.0)
    return m, change

@case
def plain_object_attr():
    class Cfg:
        def __init__(s): s.scale = 1.0
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.cfg = Cfg()
        def forward(s, x): return s.fc(x) * s.cfg.scale
    m = M()
    def change(): m.cfg.scale = 3.0
    return m, change

@case
def property_reads_obj():
    class Cfg:
        scale = 1.0
    cfg = Cfg()
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6)
        @property
        def scale(s): return cfg.scale
        def forward(s, x): return s.fc(x) * s.scale
    m = M()
    def change(): cfg.scale = 3.0
    return m, change

@case
def parametrization_attr():
    import torch.nn.utils.parametrize as P
    class Scale(nn.Module):
        def __init__(s): super().__init__(); s.k = 1.0
        def forward(s, w): return w * s.k
    m = nn.Sequential(nn.Linear(6, 6))
    P.register_parametrization(m[0], "weight", Scale())
    def change(): m[0].parametrizations.weight[0].k = 2.0
    return m, change

@case
def parametrization_added():
    import torch.nn.utils.parametrize as P
    class Scale(nn.Module):
        def forward(s, w): return w * 2.0
    m = nn.Sequential(nn.Linear(6, 6))
    def change(): P.register_parametrization(m[0], "weight", Scale())
    return m, change

@case
def descriptor_attr():
    class Desc:
        def __init__(s): s.v = 1.0
        def __get__(s, obj, typ=None): return s.v
    d = Desc()
    class M(nn.Module):
        k = d
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6)
        def forward(s, x): return s.fc(x) * s.k
    m = M()
    def change(): d.v = 4.0
    return m, change

@case
def own_getattr():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.cfg = {"scale": 1.0}
        def __getattr__(s, n):
            try: return super().__getattr__(n)
            except AttributeError:
                return s.cfg[n]
        def forward(s, x): return s.fc(x) * s.scale
    m = M()
    def change(): m.cfg["scale"] = 3.0
    return m, change

@case
def own_getattr_added():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.cfg = {"scale": 1.0}
        def __getattr__(s, n):
            try: return super().__getattr__(n)
            except AttributeError:
                return s.cfg[n]
        def forward(s, x): return s.fc(x) * s.scale
    m = M()
    def change(): m.__dict__["scale"] = 3.0
    return m, change

@case
def default_dtype():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6)
        def forward(s, x): return s.fc(x) + torch.arange(6) * 0.1
    m = M()
    def change(): torch.set_default_dtype(torch.float64)
    return m, change

@case
def slots_obj():
    class Cfg:
        __slots__ = ("scale",)
        def __init__(s): s.scale = 1.0
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.cfg = Cfg()
        def forward(s, x): return s.fc(x) * s.cfg.scale
    m = M()
    def change(): m.cfg.scale = 3.0
    return m, change

@case
def enum_like_class_in_instance():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.scales = {"a": [1.0, 2.0]}
        def forward(s, x): return s.fc(x) * s.scales["a"][0]
    m = M()
    def change(): m.scales["a"][0] = 5.0
    return m, change

@case
def tensor_in_class_list():
    class M(nn.Module):
        table = [torch.ones(6)]
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6)
        def forward(s, x): return s.fc(x) + s.table[0]
    m = M()
    def change(): M.table[0].mul_(4)
    return m, change

@case
def nested_module_in_dict_unreg():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.extra = {"l": nn.Linear(6, 6)}
        def forward(s, x): return s.extra["l"](s.fc(x))
    m = M()
    def change():
        with torch.no_grad(): m.extra["l"].bias.add_(3)
    return m, change

@case
def nested_module_in_dict_unreg_swap():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); s.extra = {"l": nn.Linear(6, 6)}
        def forward(s, x): return s.extra["l"](s.fc(x))
    m = M()
    def change(): m.extra["l"] = nn.Linear(6, 6)
    return m, change

@case
def unreg_module_attr_hook():
    class M(nn.Module):
        def __init__(s):
            super().__init__(); s.fc = nn.Linear(6, 6); object.__setattr__(s, "aux", nn.ReLU())
        def forward(s, x): return s.aux(s.fc(x) - 0.5)
    m = M()
    def change(): m.aux.register_forward_hook(lambda mod, i, o: o * 7)
    return m, change

def run(name, policy):
    torch.set_default_dtype(torch.float32)
    m, change = cases[name]()
    seeded(m)
    x = torch.randn(3, 6)
    try:
        with CoinferClient(m, (x,), server=SRV.address, policy=policy, link=FAST_LINK, tenant=new_tenant(),
                           profile_runs=2, fallback=False) as c:
            for _ in range(2):
                y = c(x)
                with torch.inference_mode():
                    assert max_abs_diff(y, m(x)) <= 1e-5
            change()
            with torch.inference_mode():
                ref = m(x)
            try:
                y2 = c(x)
            except InputError as e:
                return f"refused: {str(e)[:110]}"
            d = max_abs_diff(y2, ref)
            return f"{'WRONG' if d > 1e-4 else 'ok'} diff={d:.3g} (change effect {max_abs_diff(y, ref):.3g})"
    except Exception as e:
        return f"ERROR {type(e).__name__}: {str(e)[:150]}"
    finally:
        torch.set_default_dtype(torch.float32)

SRV = ServerThread(threads=1).start()
try:
    names = sys.argv[1:] or list(cases)
    for n in names:
        for p in ("local", "offload", "auto"):
            print(f"{n:32s} {p:8s} {run(n, p)}", flush=True)
finally:
    SRV.stop()
