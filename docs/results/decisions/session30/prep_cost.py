"""What session 30 adds to the search made while connecting, per model: ``planning._prefetch_prep`` of the warm
target with nothing held (the need order's weights, their bytes, total and ``PrefixSent``: kept on the table for
every later search), rebuilt 7 times, ms of thread CPU (median). The compiled partitions and the need order's
sorted items (made by the connect search before this session too) are already there.

    PYTHONPATH=CHECKOUT python prep_cost.py [MODEL ...]
"""

import statistics
import sys
import time
from pathlib import Path

from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu
from ue_client import planning

D = Path(__file__).resolve().parents[2] / "cold/session10/costgraphs"
for name in sys.argv[1:] or ["resnet18", "googlenet", "mobilenet_v2", "densenet121"]:
    g = CostGraph.from_json(D / f"{name}.json").scaled(ue=10.0)
    score = planning._Score(g, Link(400.0, 20.0, 5.0), UeCpu(1e-5), ServerState(), Shares(), True)
    t = score.names(score.table.decide(score.P, score.r, None, "warm")[0])
    cp = score.table._compiled(score.P, score.mask(t))
    ts = []
    for _ in range(7):
        score.table.__dict__.pop("_prefetch_prep", None)
        cp.__dict__.pop("_group_index", None)
        c0 = time.thread_time()
        planning._prefetch_prep(score, t)
        ts.append((time.thread_time() - c0) * 1e3)
    print(f"{name}: {len(t)} target ops, {len(g.weights)} weights: {statistics.median(ts):.3f} ms CPU (median of 7)")
