"""Replay auto's first decision of two session-14 grid cells offline, from the UE's inputs as logged, and weigh
its strategies (never offload, invest now, prefetch: local while the target goes up, remote after) beside
``partitioner.streambound`` on the same inputs.

The UE's cost graph is not in the logs: tests/data/costgraphs/<model>.json is scaled so that its UE sum is the
local prediction the row's plan_reason implies (stay / horizon) and its server sum the row's
``predicted_parts.server_ms``; the link, horizon and send cost (the stream's ``send_cpu_mbps``: the worker's
connect-time probe) are the row's. Variants: the send cost grid 14's bound measured in the cell
(``send ms/MB`` column of docs/results/full/session14/results.md), the server part x 1.3.

Usage (from the repository root): PYTHONPATH=$PWD python docs/results/coldauto/session15/replay_decision.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from partitioner import Link
from partitioner.costgraph import CostGraph
from partitioner.state import Shares
from partitioner.streambound import Target, stream_bound
from partitioner.uecpu import UeCpu
from ue_client import planning

ROOT = Path(__file__).resolve().parents[4]
LOGS = ROOT / "docs/results/full/session14/logs"
CELLS = {  # cell: (cost graph, grid-14 log, the send cost grid 14's bound measured in the cell, ms/MB)
    "resnet18 10 %/400": ("resnet18", "ue2", 9.69),
    "mobilenet_v2 10 %/100": ("mobilenet_v2", "ue7", 46.28),
}


def decide(name: str, local_ms: float, server_ms: float, link: Link, s: float, horizon: int) -> dict:
    g = CostGraph.from_json(ROOT / "tests/data/costgraphs" / f"{name}.json")
    g = g.scaled(ue=local_ms / sum(o.ue_ms for o in g.ops), server=server_ms / sum(o.server_ms for o in g.ops))
    seen = {}
    real = planning._prefetch_best

    def spy(*a, **k):
        seen["prefetch"] = real(*a[:4], margin=-math.inf)  # the best prefetch, whatever it beats
        return real(*a, **k)

    planning._prefetch_best = spy
    try:
        c = planning.choose("auto", g, link, ue_cpu=UeCpu(s), horizon=horizon, share=Shares(1.0, 1.0))
    finally:
        planning._prefetch_best = real
    d = c.details
    b = stream_bound(horizon, c.local_ms, [Target(sum(g.weights.values()), d["target_warm_ms"])],
                     link.uplink_mbps, link.rtt_ms, s)
    pf = seen.get("prefetch")
    return {"reason": c.reason, "never": d.get("horizon_stay_ms", horizon * c.local_ms),
            "invest": d.get("horizon_invest_ms"), "prefetch": None if pf is None else pf["total_ms"],
            "prefetch_mb": None if pf is None else pf["bytes"] / 1e6, "warm": d["target_warm_ms"],
            "bound": b.total_ms, "bound_first_remote": b.first_remote, "bound_mb": b.prefetch_bytes / 1e6}


def main() -> None:
    print("| cell | inputs | auto's choice | never | invest now | best prefetch (MB in request 1) | "
          "bound on the same inputs (strategy) |")
    print("|---|---|---|---|---|---|---|")
    for cell, (name, log, cell_send) in CELLS.items():
        d = json.loads((LOGS / f"{log}.json").read_text())
        sp, co = d["spec"], d["streams"]["coinfer"]
        r0 = co["requests"][0]
        horizon = sp["requests"]
        stay = float(r0["plan_reason"].split(" vs ")[1].split(" ms")[0])
        link = Link(sp["uplink_mbps"], sp["uplink_mbps"], sp["rtt_ms"])
        probe = 1.0 / (co["send_cpu_mbps"] * 125.0)
        srv = r0["predicted_parts"]["server_ms"]
        print(f"| {cell} | logged (request 1) | {r0['plan_reason']} | | | | |")
        for label, s, scale in ((f"replay: probe {probe * 1e6:.2f} ms/MB", probe, 1.0),
                                (f"cell's measured send {cell_send:.2f} ms/MB", cell_send / 1e6, 1.0),
                                ("probe, server part x 1.3", probe, 1.3)):
            r = decide(name, stay / horizon, srv * scale, link, s, horizon)
            strat = ("remote from #1" if r["bound_first_remote"] == 1 else
                     f"local x{r['bound_first_remote'] - 1}, {r['bound_mb']:.1f} MB ahead")
            pf = "-" if r["prefetch"] is None else f"{r['prefetch']:.0f} ({r['prefetch_mb']:.1f})"
            print(f"| {cell} | {label} | {r['reason'].split(':')[0]} | {r['never']:.0f} | {r['invest']:.0f} | "
                  f"{pf} | {r['bound']:.0f} ({strat}) |")


if __name__ == "__main__":
    main()
