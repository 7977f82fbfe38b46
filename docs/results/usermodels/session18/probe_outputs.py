# session 18 (newuser18) probe, run from the repository root (commands in results.md)
import dataclasses
import sys

import torch
import torch.nn as nn

sys.path.insert(0, ".")
from ue_client import CoinferClient
from ue_client.verify import max_abs_diff


def case(name, fn):
    try:
        print("CASE", name, "->", fn(), flush=True)
    except Exception as e:
        print("CASE", name, "RAISED", type(e).__name__, str(e)[:300], flush=True)


x = torch.randn(3, 4)


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(4, 4)

    def forward(s, x):
        return s.fc(x)


class CallOverride(Net):
    def __call__(s, x):
        return super().__call__(x * 2)


def co():
    m = CallOverride().eval()
    c = CoinferClient(m, (x,))
    return max_abs_diff(c(x), m(x).detach())


case("__call__ overridden", co)


class Out(dict):
    pass


class DictSub(Net):
    def forward(s, x):
        return Out(y=s.fc(x))


def ds():
    m = DictSub().eval()
    c = CoinferClient(m, (x,))
    y = c(x)
    return type(y).__name__, max_abs_diff(dict(y), dict(m(x)))


case("unregistered dict subclass output", ds)


@dataclasses.dataclass
class DC:
    y: torch.Tensor


class DCOut(Net):
    def forward(s, x):
        return DC(s.fc(x))


def dc():
    m = DCOut().eval()
    c = CoinferClient(m, (x,))
    y = c(x)
    return type(y).__name__


case("unregistered dataclass output", dc)


class SetOut(Net):
    def forward(s, x):
        return s.fc(x), {1, 2}


def so():
    m = SetOut().eval()
    c = CoinferClient(m, (x,))
    y = c(x)
    return y[1]


case("set constant output", so)


class RetType(Net):
    def forward(s, x):
        return s.fc(x).max(-1)


def rt():
    m = RetType().eval()
    c = CoinferClient(m, (x,))
    y = c(x)
    return type(y).__name__, type(m(x)).__name__


case("torch.return_types output", rt)


class Fwd2(Net):
    def forward(s, x, y=None):
        return s.fc(x) if y is None else s.fc(x) + y


def f2():
    m = Fwd2().eval()
    c = CoinferClient(m, (x,))
    return max_abs_diff(c(x, x), m(x, x).detach()), max_abs_diff(c(x, y=None), m(x).detach())


case("optional arg given at call", f2)


class TensorAttrOut(Net):
    def __init__(s):
        super().__init__()
        s.register_buffer("w", torch.randn(4, 3).t())

    def forward(s, x):
        return s.fc(x), s.w


def tao():
    m = TensorAttrOut().eval()
    c = CoinferClient(m, (x,))
    y = c(x)
    e = m(x)
    return y[1].stride(), e[1].stride(), max_abs_diff(y[1], e[1])


case("non-contiguous buffer returned", tao)
