"""review21 finding 1, rerun after fix21: forwards whose output depends on Python state the forward itself moves
(a sign that flips on every 5th call: the export's, the check's and capture's extra call all see +1), and
deterministic forwards that move state the output does not depend on. Each is captured or refused; a captured one
is compared with eager on 20 calls. Reviewer's reproduction: /tmp/rv21p/p8b_python_state_period5.py (its output
before: p8b.out, 11 of 15 captured with 4/20 or 16/20 calls wrong).

    PYTHONPATH=$PWD python docs/results/usermodels/session21/fix21_period5.py
"""
import array
import collections
import functools
import itertools

import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.errors import CaptureError
from modelgraph.execute import run_graph


def sign(v):
    return -1.0 if v % 5 == 0 else 1.0


class Base(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(4, 4)


class IntAttr(Base):
    def __init__(s):
        super().__init__()
        s.n = 0

    def forward(s, x):
        s.n += 1
        return s.fc(x) * sign(s.n)


class Helper:
    def __init__(s):
        s.n = 0


class HelperAttr(Base):
    def __init__(s):
        super().__init__()
        s.h = Helper()

    def forward(s, x):
        s.h.n += 1
        return s.fc(x) * sign(s.h.n)


def make_counter():
    n = 0

    def step():
        nonlocal n
        n += 1
        return n
    return step


STEP = make_counter()


class Closure(Base):
    def forward(s, x):
        return s.fc(x) * sign(STEP())


class Count(Base):
    def __init__(s):
        super().__init__()
        s.c = itertools.count(1)

    def forward(s, x):
        return s.fc(x) * sign(next(s.c))


class Cycle(Base):
    def __init__(s):
        super().__init__()
        s.c = itertools.cycle([1.0, 1.0, 1.0, 1.0, -1.0])

    def forward(s, x):
        return s.fc(x) * next(s.c)


def gen():
    while True:
        yield 1.0
        yield 1.0
        yield 1.0
        yield 1.0
        yield -1.0


class PyGen(Base):
    def __init__(s):
        super().__init__()
        s.g = gen()

    def forward(s, x):
        return s.fc(x) * next(s.g)


class Deque(Base):
    def __init__(s):
        super().__init__()
        s.d = collections.deque([1.0, 1.0, 1.0, 1.0, -1.0])

    def forward(s, x):
        s.d.rotate(1)
        return s.fc(x) * s.d[0]


class ArrayState(Base):
    def __init__(s):
        super().__init__()
        s.a = array.array("d", [1.0])

    def forward(s, x):
        s.a[0] += 1
        return s.fc(x) * sign(s.a[0])


G = {"n": 0}


class GlobalDict(Base):
    def forward(s, x):
        G["n"] += 1
        return s.fc(x) * sign(G["n"])


class ClassAttr(Base):
    n = 0

    def forward(s, x):
        type(s).n += 1
        return s.fc(x) * sign(type(s).n)


class HelperList(Base):
    def __init__(s):
        super().__init__()
        s.h2 = Helper()
        s.h2.hist = []

    def forward(s, x):
        s.h2.hist.append(1)
        return s.fc(x) * sign(len(s.h2.hist))


class LruCounter(Base):
    def __init__(s):
        super().__init__()
        s.f = functools.lru_cache(maxsize=None)(lambda k: k)

    def forward(s, x):
        s.f(1)
        i = s.f.cache_info()
        return s.fc(x) * sign(i.misses + i.hits)


class ByteArr(Base):
    def __init__(s):
        super().__init__()
        s.b = bytearray(1)

    def forward(s, x):
        s.b[0] += 1
        return s.fc(x) * sign(s.b[0])


class MemoView(Base):
    def __init__(s):
        super().__init__()
        s.buf = bytearray(8)
        s.mv = memoryview(s.buf).cast("d")

    def forward(s, x):
        s.mv[0] += 1
        return s.fc(x) * sign(s.mv[0])


# deterministic: the output does not depend on what moves
SHAPES = []
CACHE = {}
TIMES = {}


@functools.cache
def inv(n):
    return 1.0 / n


class HookShapes(Base):
    def __init__(s):
        super().__init__()
        s.fc.register_forward_hook(lambda m, i, o: SHAPES.append(tuple(o.shape)))

    def forward(s, x):
        return s.fc(x)


class FirstCallCache(Base):
    def forward(s, x):
        pos = CACHE.setdefault(x.shape[-1], [i / 10 for i in range(x.shape[-1])])
        return s.fc(x + torch.tensor(pos))


class PureMemo(Base):
    def forward(s, x):
        return s.fc(x) * inv(x.shape[-1])


class LogList(Base):
    def __init__(s):
        super().__init__()
        s.rec = Helper()
        s.rec.log = []

    def forward(s, x):
        s.rec.log.append(len(s.rec.log))
        return s.fc(x)


class LogCounter(Base):  # refused (a rebound counter), though only logged: as one on the module always was
    def __init__(s):
        super().__init__()
        s.rec = Helper()

    def forward(s, x):
        s.rec.n += 1
        return s.fc(x)


class TimingDict(Base):  # refused (a dict value changed), though only logged
    def forward(s, x):
        TIMES["calls"] = TIMES.get("calls", 0) + 1
        return s.fc(x)


def out(r):
    return r[0] if isinstance(r, tuple | list) else r


STATEFUL = (IntAttr, HelperAttr, Closure, Count, Cycle, PyGen, Deque, ArrayState, GlobalDict, ClassAttr, HelperList,
            LruCounter, ByteArr, MemoView)
DETERMINISTIC = (HookShapes, FirstCallCache, PureMemo, LogList, LogCounter, TimingDict)
for group, models in (("depends on the moved state", STATEFUL), ("does not depend on it", DETERMINISTIC)):
    print(f"-- output {group}")
    for M in models:
        torch.manual_seed(0)
        m = M().eval()
        x = torch.randn(2, 4)
        try:
            g = capture(m, (x,))
        except CaptureError as e:
            print(f"{M.__name__:16s} refused: {str(e)[:150]}", flush=True)
            continue
        with torch.no_grad():
            wrong = sum(not torch.allclose(out(run_graph(g, (x,))), m(x)) for _ in range(20))
        print(f"{M.__name__:16s} CAPTURED; {wrong}/20 calls differ from eager", flush=True)
