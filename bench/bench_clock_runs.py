"""What capture's faked-clock runs cost (session 24): capture time of a zoo model that reads the clock in forward (a
timing log: ``time.perf_counter()`` around the network, kept on the module) and of the same model without it.

A forward that reads a clock runs again on faked clocks (``capture._varies``, ``pystate.clock_bases``): the
difference between the two columns is those runs; ``varies_s`` times ``capture._varies`` itself (the runs and their
comparison), which the machine's noise hides less. Run it once per checkout, side by side (alternating):

    PYTHONPATH=. .venv/bin/python bench/bench_clock_runs.py --rounds 5
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import torch
from torch import nn

from modelgraph import capture
from modelgraph.zoo import ZOO


class Timed(nn.Module):
    """``net`` with a timing log: deterministic, captured."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.last_ms = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = self.net(x)
        self.last_ms = (time.perf_counter() - t0) * 1000
        return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small", choices=sorted(ZOO))
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net, inputs = ZOO[a.model]()
    net = net.eval()
    x = inputs[0]
    with torch.no_grad():
        for _ in range(3):
            net(x)
        t0 = time.perf_counter()
        for _ in range(5):
            net(x)
        fwd = (time.perf_counter() - t0) / 5
    import modelgraph

    out: dict = {"modelgraph": modelgraph.__file__, "model": a.model, "forward_s": fwd, "plain_s": [], "timed_s": []}
    capture_mod = importlib.import_module("modelgraph.capture")

    spent = [0.0]
    varies = capture_mod._varies

    def timed_varies(*args: object, **kw: object) -> object:  # the faked-clock runs' own time, apart from the noise
        t0 = time.perf_counter()
        try:
            return varies(*args, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    capture_mod._varies = timed_varies
    out["varies_s"] = []
    capture(Timed(net).eval(), (x,))  # warm-up (imports, caches)
    for _ in range(a.rounds):
        for key, m in (("plain_s", net), ("timed_s", Timed(net).eval())):
            spent[0] = 0.0
            t0 = time.perf_counter()
            capture(m, (x,))
            out[key].append(time.perf_counter() - t0)
            if key == "timed_s":
                out["varies_s"].append(spent[0])
    for key in ("plain_s", "timed_s", "varies_s"):
        out[key.replace("_s", "_median_s")] = statistics.median(out[key])
    out["clock_runs_s"] = out["timed_median_s"] - out["plain_median_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
