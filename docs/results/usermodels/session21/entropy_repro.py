"""The fresh tester's finding (session 20, finding 1) and its neighbours: a 50/50 branch on a generator made anew in
forward. For each kind, 6 seeds: captured or refused (the refusal's first words), and for a captured model how many
of 15 later calls of the captured graph differ from eager ``model(x)``. Run from a tree's root with PYTHONPATH=that
root; one JSON line per kind on stdout.

    PYTHONPATH=$TREE .venv/bin/python docs/results/usermodels/session21/entropy_repro.py TAG
"""
import json
import random
import sys
import time
import uuid

import numpy as np
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.errors import CaptureError
from modelgraph.execute import run_graph

KINDS = {
    "np.random.default_rng()": lambda: np.random.default_rng().random() < 0.5,
    "random.Random()": lambda: random.Random().random() < 0.5,
    "np.random.RandomState()": lambda: np.random.RandomState().rand() < 0.5,
    "uuid.uuid4()": lambda: uuid.uuid4().int % 2 == 0,
    "random.Random(time.time_ns())": lambda: random.Random(time.time_ns()).random() < 0.5,
    "np.random.default_rng(time.time_ns())": lambda: np.random.default_rng(time.time_ns()).random() < 0.5,
    "random.Random(0) (deterministic)": lambda: random.Random(0).random() < 0.5,
    "np.random.default_rng(42) (deterministic)": lambda: np.random.default_rng(42).random() < 0.5,
}


class Branch(nn.Module):
    def __init__(self, coin) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.coin = coin

    def forward(self, x):
        y = self.fc(x)
        return y if self.coin() else -y


for kind, coin in KINDS.items():
    rows = []
    for seed in range(1, 7):
        torch.manual_seed(seed)
        m = Branch(coin).eval()
        x = torch.randn(2, 4)
        try:
            g = capture(m, (x,))
        except CaptureError as e:
            rows.append({"seed": seed, "refused": str(e).split(":")[0][:40] + ": " + str(e).split(":", 1)[1][:70]})
            continue
        with torch.no_grad():
            wrong = sum(not torch.allclose(run_graph(g, (x,)), m(x)) for _ in range(15))
        rows.append({"seed": seed, "captured": True, "calls_wrong_of_15": wrong})
    print(json.dumps({"tree": sys.argv[1] if len(sys.argv) > 1 else "", "kind": kind,
                      "captured": sum("captured" in r for r in rows), "of": len(rows),
                      "calls_wrong": [r["calls_wrong_of_15"] for r in rows if "captured" in r],
                      "refusals": sorted({r["refused"] for r in rows if "refused" in r})[:2]}))
