"""What ``OnlineTable.warm`` moves off the first decision with weights held: per model (the kept cost graphs, UE 10x
slower), the first ``OnlineTable.decide`` with half of ``auto``'s warm target held (the turning point of a prefetch
plan), on a fresh copy of the table made without the warm-up and on one made with it (each copy from the table's
JSON, as a client loads it), and the warm-up's own time (where the table is made: while connecting). Thread CPU ms,
median of ``--reps`` fresh copies each, the two kinds interleaved.

    flock /work/wt/.bench.lock python docs/results/plan_ms/session21/warm_cost.py [--reps 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

from partitioner import online  # noqa: E402
from partitioner.costgraph import CostGraph, Link  # noqa: E402
from partitioner.prep import prepare  # noqa: E402
from partitioner.simulate import Rates  # noqa: E402
from partitioner.state import ServerState  # noqa: E402
from ue_client import planning  # noqa: E402

COSTS = ROOT / "docs/results/cold/session10/costgraphs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,mobilenet_v2,googlenet,resnet50")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--mbps", type=float, default=100.0)
    a = ap.parse_args()
    real_warm = online.OnlineTable.warm
    out = {}
    print("| model | candidates | first held decide, no warm-up (ms CPU) | with warm-up | warm-up itself |")
    print("|---|---|---|---|---|")
    for m in a.models.split(","):
        g = CostGraph.from_json(COSTS / f"{m}.json").scaled(ue=10.0)
        P = prepare(g)
        link = Link(a.mbps, rtt_ms=20.0)
        target = planning.choose("auto", g, link, horizon=8).warm_target or frozenset()
        tw = sorted({w for op in g.ops if op.name in target for w in op.weights})
        state = ServerState(held=frozenset(tw[: len(tw) // 2]))
        table = planning.online_table(g)
        text = online.to_json(table)
        r = Rates.of(link)
        cold, warm, wu = [], [], []
        for _ in range(a.reps):
            for kind in ("cold", "warm"):
                if kind == "cold":
                    online.OnlineTable.warm = lambda self, P: None
                try:
                    t = online.from_json(g, text, use_cache=False)
                finally:
                    online.OnlineTable.warm = real_warm
                if kind == "warm":  # (from_json warmed it already: time one more warm-up on a fresh cold copy)
                    online.OnlineTable.warm = lambda self, P: None
                    try:
                        t2 = online.from_json(g, text, use_cache=False)
                    finally:
                        online.OnlineTable.warm = real_warm
                    c0 = time.thread_time()
                    t2.warm(P)
                    wu.append((time.thread_time() - c0) * 1e3)
                c0 = time.thread_time()
                t.decide(P, r, state, send_ms_per_byte=2e-5)
                (cold if kind == "cold" else warm).append((time.thread_time() - c0) * 1e3)
        row = {"candidates": len(table.candidates), "cold_ms": statistics.median(cold),
               "warm_ms": statistics.median(warm), "warmup_ms": statistics.median(wu)}
        out[m] = row
        print(f"| {m} | {row['candidates']} | {row['cold_ms']:.3f} | {row['warm_ms']:.3f} | {row['warmup_ms']:.3f} |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
