"""models22 (session 22): the users' models still captured with wrong answers after session 21, and the false
refusals. Self-contained (the models are defined here) so it runs against any tree: each case captured 8 times (a
fresh module each time); a captured one is called 20 times and compared with eager. One JSON line per case.

    PYTHONPATH=TREE python docs/results/usermodels/session22/repro22.py TREE    # from TREE's root
"""
import itertools
import json
import os
import pathlib
import random
import sys
import tempfile
import time
from time import time_ns

import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.errors import CaptureError
from modelgraph.execute import run_graph


def sign(v):
    return -1.0 if v % 5 == 4 else 1.0


class Base(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(4, 4)


class Helper:
    def __init__(s):
        s.calls = 0
        s.log = []


# ---- wrong answers before ----
class CountSign(Base):
    def __init__(s):
        super().__init__()
        s.calls = itertools.count(1)

    def forward(s, x):
        return s.fc(x) * sign(next(s.calls))


CALLS = itertools.count()


class GlobalCountBranch(Base):
    def forward(s, x):
        n = next(CALLS) % 5
        if n == 4:
            x = -x
        return s.fc(x)


class GrownLen(Base):
    def __init__(s):
        super().__init__()
        s.h = Helper()

    def forward(s, x):
        s.h.log.append(tuple(x.shape))
        if len(s.h.log) % 5 == 4:
            x = -x
        return s.fc(x)


SHAPES = []


class GlobalGrownLen(Base):
    def forward(s, x):
        SHAPES.append(tuple(x.shape))
        return s.fc(x) * sign(len(SHAPES))


class UrandomOpen(Base):
    def forward(s, x):
        with open("/dev/urandom", "rb") as f:
            bit = f.read(1)[0] % 2
        return s.fc(x) * (-1.0 if bit else 1.0)


class UrandomPath(Base):
    def forward(s, x):
        with pathlib.Path("/dev/urandom").open("rb") as f:
            bit = f.read(1)[0] % 2
        return s.fc(x) * (-1.0 if bit else 1.0)


class UrandomOsOpen(Base):
    def forward(s, x):
        fd = os.open("/dev/urandom", os.O_RDONLY)
        try:
            bit = os.read(fd, 1)[0] % 2
        finally:
            os.close(fd)
        return s.fc(x) * (-1.0 if bit else 1.0)


class ClockParity(Base):
    def forward(s, x):
        if time.time_ns() % 2:
            x = -x
        return s.fc(x)


class ClockImported(Base):
    def forward(s, x):
        return s.fc(x) * (-1.0 if (time_ns() // 1000) % 2 else 1.0)


class SecondParity(Base):
    def forward(s, x):
        return s.fc(x) * (-1.0 if int(time.time()) % 2 else 1.0)


# ---- refused before, deterministic ----
class ReseededRandom(Base):
    def forward(s, x):
        rng = random.Random()
        rng.seed(5)
        return s.fc(x) * rng.random()


class HelperLogCounter(Base):
    def __init__(s):
        super().__init__()
        s.h = Helper()

    def forward(s, x):
        s.h.calls += 1
        return s.fc(x)


STATS = {"ms": 0.0, "calls": 0}


class TimingDict(Base):
    def forward(s, x):
        t0 = time.perf_counter()
        y = s.fc(x)
        STATS["ms"] += (time.perf_counter() - t0) * 1000
        STATS["calls"] += 1
        return y


LOGFILE = os.path.join(tempfile.gettempdir(), f"repro22-{os.getpid()}.log")


class LogFile(Base):
    def forward(s, x):
        with open(LOGFILE, "a") as f:
            f.write("call\n")
        return s.fc(x)


# ---- their wrong-answer variants ----
class DrawnBeforeSeed(Base):
    def forward(s, x):
        rng = random.Random()
        scale = rng.random()
        rng.seed(5)
        return s.fc(x) * scale


class HelperCounterRead(Base):
    def __init__(s):
        super().__init__()
        s.h = Helper()

    def forward(s, x):
        s.h.calls += 1
        return s.fc(x) * sign(s.h.calls)


READ = {"calls": 0}


class TimingDictRead(Base):
    def forward(s, x):
        READ["calls"] += 1
        return s.fc(x) * sign(READ["calls"])


CASES = {
    "wrong before": (CountSign, GlobalCountBranch, GrownLen, GlobalGrownLen, UrandomOpen, UrandomPath, UrandomOsOpen,
                     ClockParity, ClockImported, SecondParity),
    "refused before, deterministic": (ReseededRandom, HelperLogCounter, TimingDict, LogFile),
    "wrong-answer variants": (DrawnBeforeSeed, HelperCounterRead, TimingDictRead),
}


def main() -> None:
    tree = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()
    for group, classes in CASES.items():
        for cls in classes:
            captured = wrong = 0
            why = ""
            for seed in range(8):
                torch.manual_seed(seed)
                m = cls().eval()
                x = torch.randn(2, 4)
                try:
                    g = capture(m, (x,))
                except CaptureError as e:
                    why = why or str(e)[:160]
                    continue
                captured += 1
                with torch.no_grad():
                    wrong += sum(not torch.allclose(run_graph(g, (x,)), m(x)) for _ in range(20))
            print(json.dumps({"tree": tree, "group": group, "case": cls.__name__, "captured_of_8": captured,
                              "wrong_calls": wrong, "of_calls": captured * 20, "a_refusal": why}), flush=True)


if __name__ == "__main__":
    main()
