"""What watching the model for changes costs a UE: ``WeightWatch.check()`` per call (every request runs it) and the
capture of the model (the eager check's tracing), on torchvision models with random weights (1x3x224x224).

    flock /work/wt/.bench.lock python bench/bench_watch_cost.py [--models resnet18,mobilenet_v2,densenet121]
        [--rounds 5] [--calls 200] [--json FILE]

Per model: ``check_ms``, the median over ``--rounds`` rounds of ``--calls`` calls of the process CPU time per call
(``time.process_time``, one torch thread), each round's value in ``check_rounds_ms``; ``capture_s``, the wall time of
``prepare_model`` (torch.export, the eager check, the graph run). Run it with ``PYTHONPATH`` at another checkout for
its before-numbers (session 15's ``docs/results/watch/session15/watch_cost.txt`` used the same loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ue_client.model import WeightWatch, prepare_model


def measure(name: str, rounds: int, calls: int) -> dict:
    """``check_ms`` (median of ``rounds``), ``check_rounds_ms``, ``capture_s`` of ``torchvision:name``."""
    t0 = time.perf_counter()
    pm = prepare_model("torchvision:" + name)
    capture_s = time.perf_counter() - t0
    watch = WeightWatch(pm.graph, pm.module)
    watch.check()
    per_round = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(calls):
            watch.check()
        per_round.append((time.process_time() - t) / calls * 1e3)
    return {"check_ms": round(statistics.median(per_round), 4), "check_rounds_ms": [round(r, 4) for r in per_round],
            "capture_s": round(capture_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenet_v2,densenet121")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    print(f"{'model':14s} {'check ms/call':>14s} {'capture s':>10s}  rounds")
    for name in a.models.split(","):
        r = out[name] = measure(name, a.rounds, a.calls)
        print(f"{name:14s} {r['check_ms']:14.4f} {r['capture_s']:10.2f}  {r['check_rounds_ms']}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
