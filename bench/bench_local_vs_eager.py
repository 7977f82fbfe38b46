"""Local execution through the device runtime (the captured graph, what `local` runs and fallbacks use)
against calling the user's eager module, side by side: interleaved runs, one torch thread, medians.

    python bench/bench_local_vs_eager.py [--models torchvision:resnet18 ...] [--runs 15] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ue_client import CoinferClient


def measure(spec: str, runs: int) -> dict:
    """Median ms of ``runs`` interleaved calls of the client (no server) and of the eager module."""
    c = CoinferClient(spec)
    m, x = c.model.module, c.example_inputs
    for _ in range(3):
        c(*x)
        with torch.inference_mode():
            m(*x)
    graph, eager = [], []
    for _ in range(runs):
        t = time.perf_counter()
        c(*x)
        graph.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        with torch.inference_mode():
            m(*x)
        eager.append((time.perf_counter() - t) * 1e3)
    g, e = statistics.median(graph), statistics.median(eager)
    return {"model": spec, "runs": runs, "graph_ms": g, "eager_ms": e, "ratio": g / e}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["torchvision:resnet18", "torchvision:mobilenet_v2"])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [measure(spec, args.runs) for spec in args.models]
    print(f"{'model':<28} {'graph ms':>9} {'eager ms':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<28} {r['graph_ms']:>9.1f} {r['eager_ms']:>9.1f} {r['ratio']:>6.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
