"""Replay auto's connect-time decision (horizon 8) of session 31's full-grid cells where coinfer stayed local
although the stream bound was below local, at several investment margins, beside the stream bound on the same
inputs.

The UE's cost graph is not in the logs: tests/data/costgraphs/<model>.json is scaled so that its UE sum is the
decision's logged local prediction (request 1's ``predicted_ms``) and its whole-model warm prediction is the
cell's least warm mean of the remote baselines (NS / DADS after their upload); the link, horizon and send cost
(the stream's ``send_cpu_mbps``) are the row's.

Usage (from the repository root): PYTHONPATH=$PWD .venv/bin/python docs/results/margin/session32/replay_margin.py
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from partitioner import Link
from partitioner.costgraph import CostGraph
from partitioner.state import Shares
from partitioner.streambound import Target, stream_bound
from partitioner.uecpu import UeCpu
from ue_client import planning

ROOT = Path(__file__).resolve().parents[4]
LOGS = ROOT / "docs/results/full/session31/logs"
CELLS = {"resnet18 25 %/400": ("resnet18", "ue5"), "mobilenet_v2 10 %/100": ("mobilenet_v2", "ue7")}
MARGINS = (0.2, 0.15, 0.1, 0.05)


def graph(name: str, local_ms: float, warm_ms: float, link: Link, s: float) -> CostGraph:
    g = CostGraph.from_json(ROOT / "tests/data/costgraphs" / f"{name}.json")
    g = g.scaled(ue=local_ms / sum(o.ue_ms for o in g.ops), server=1.0)
    lo, hi = 1e-3, 100.0
    for _ in range(60):  # the server scale whose whole-model warm prediction is the measured warm mean
        mid = math.sqrt(lo * hi)
        h = g.scaled(ue=1.0, server=mid)
        sc = planning._scorer(h, link, UeCpu(s), None, Shares(1.0, 1.0), False)
        w = sc(frozenset(o.name for o in h.ops), "warm").latency_ms
        lo, hi = (mid, hi) if w < warm_ms else (lo, mid)
    return g.scaled(ue=1.0, server=lo)


def main() -> None:
    print("| cell | send ms/MB (probe) | margin | auto's choice | invest now | best prefetch (any margin) | never | "
          "bound on the same inputs |")
    print("|---|---|---|---|---|---|---|---|")
    for cell, (name, log) in CELLS.items():
        d = json.loads((LOGS / f"{log}.json").read_text())
        sp, streams = d["spec"], d["streams"]
        co = streams["coinfer"]
        horizon = sp["requests"]
        local = co["requests"][0]["predicted_ms"]
        warm = min(statistics.mean(r["latency_ms"] for r in streams[p]["requests"][1:])
                   for p in ("neurosurgeon-serial", "dads-serial"))
        link = Link(sp["uplink_mbps"], sp["uplink_mbps"], sp["rtt_ms"])
        s = 1.0 / (co["send_cpu_mbps"] * 125.0)
        g = graph(name, local, warm, link, s)
        b = stream_bound(horizon, local, [Target(sum(g.weights.values()), warm)], link.uplink_mbps, link.rtt_ms, s)
        for m in MARGINS:
            seen = {}
            real = planning._prefetch_best

            def spy(*a, _real=real, _seen=seen, **k):
                _seen["prefetch"] = _real(*a[:4], margin=-math.inf)  # the best prefetch, whatever it beats
                return _real(*a, **k)

            planning._prefetch_best = spy
            try:
                c = planning.choose("auto", g, link, ue_cpu=UeCpu(s), horizon=horizon, share=Shares(1.0, 1.0),
                                    invest_margin=m)
            finally:
                planning._prefetch_best = real
            pf = seen.get("prefetch")
            print(f"| {cell} | {s * 1e6:.2f} | {m} | {c.reason.split(':')[0] or 'local'} | "
                  f"{c.details.get('horizon_invest_ms', math.nan):.0f} | "
                  f"{'-' if pf is None else format(pf['total_ms'], '.0f')} | {horizon * c.local_ms:.0f} | "
                  f"{b.total_ms:.0f} (first remote #{b.first_remote}) |")


if __name__ == "__main__":
    main()
