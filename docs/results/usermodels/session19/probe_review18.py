"""Session 19: the review of session 18's users' models (/tmp/rv18p p1, p2, p3, p8, p9, p13), in one script.

Run from the repository root: PYTHONPATH=$PWD .venv/bin/python docs/results/usermodels/session19/probe_review18.py
Prints, per case, whether the client refused it (and the message) or captured it, and then how many of 30 calls
differ from the user's eager ``model(x)``."""

import random

import numpy as np
import torch

from modelgraph.tv_compat import import_torchvision
from ue_client import CoinferClient, InputError

tv = import_torchvision()
GEN, PRNG = np.random.default_rng(1), random.Random(1)


class Lin(torch.nn.Module):
    def __init__(self, **attrs):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)
        for k, v in attrs.items():
            setattr(self, k, v)


class FlipOnModule(Lin):  # p2
    def forward(self, x):
        return self.l(x.flip(-1) if self.rng.random() < 0.3 else x)


class FlipGlobalGenerator(Lin):  # p3
    def forward(self, x):
        return self.l(x.flip(-1) if GEN.random() < 0.3 else x)


class FlipGlobalRandom(Lin):  # p3
    def forward(self, x):
        return self.l(x.flip(-1) if PRNG.random() < 0.3 else x)


class SqrtAndFlagNamedRandom(Lin):  # p1
    def forward(self, x):
        return self.l(x + 0.0 if self.random else x) / np.sqrt(8)


class SeededPerCall(Lin):  # p1
    def forward(self, x):
        return self.l(x) * random.Random(0).randint(1, 3)


class TrainOnlyNoise(Lin):  # p9
    def forward(self, x):
        if self.training:
            x = x + torch.from_numpy(np.random.randn(*x.shape).astype("float32")) * 0.1
        return self.l(x)


class Skip(Lin):  # p8
    def forward(self, x):
        return self.ff.add(self.l(x), x)


CASES = [
    ("p2 Generator on the module", FlipOnModule(rng=np.random.default_rng(1)), (2, 8)),
    ("p2 RandomState on the module", FlipOnModule(rng=np.random.RandomState(1)), (2, 8)),
    ("p3 module-level default_rng()", FlipGlobalGenerator(), (2, 8)),
    ("p3 module-level random.Random(1)", FlipGlobalRandom(), (2, 8)),
    ("p1 np.sqrt + a flag named random", SqrtAndFlagNamedRandom(random=False), (2, 8)),
    ("p1 random.Random(0) made in forward", SeededPerCall(), (2, 8)),
    ("p9 np.random only in training", TrainOnlyNoise(), (2, 8)),
    ("p8 FloatFunctional skip add", Skip(ff=torch.ao.nn.quantized.FloatFunctional()), (2, 8)),
    ("p8 tv quantization.mobilenet_v2(quantize=False)",
     tv.models.quantization.mobilenet_v2(weights=None, quantize=False), (1, 3, 64, 64)),
]

for name, m, shape in CASES:
    torch.manual_seed(0)
    m.eval()
    x = torch.randn(*shape)
    try:
        c = CoinferClient(m, (x,))
    except InputError as e:
        print(f"{name}: REFUSED: {e}")
        continue
    with torch.no_grad():
        bad = sum(not torch.allclose(c(x), m(x), atol=1e-5) for _ in range(30))
    print(f"{name}: captured; calls differing from model(x): {bad} / 30")


class Det(torch.nn.Module):  # p13
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 4)
        self.register_buffer("anchors", torch.arange(12.0).reshape(3, 4))

    def forward(self, x):
        return {"cls": self.l(x), "anchors": self.anchors}


m = Det().eval()
x = torch.randn(2, 4)
c = CoinferClient(m, (x,))
y = c(x)
print("p13 returned buffer is the module's own tensor:", y["anchors"] is m.anchors)
y["anchors"].mul_(2)
with torch.no_grad():
    e = m(x)
try:
    print("p13 after y['anchors'].mul_(2): client", c(x)["anchors"][0].tolist(), "eager", e["anchors"][0].tolist())
except InputError as err:
    print("p13 after y['anchors'].mul_(2): client REFUSED:", err, "| eager", e["anchors"][0].tolist())
