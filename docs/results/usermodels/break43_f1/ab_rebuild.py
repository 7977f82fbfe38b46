"""break43 F1: does the per-call change (``pytree_io.rebuild_outputs`` also hands ``as_callers`` the weights some
output views, ``OutputLayout.bases``) cost local resnet18 / mobilenet_v2 calls anything? Interleaved A/B on one local
client per model, one torch thread: ``before`` is the previous ``rebuild_outputs`` (inputs only), ``after`` the
current one; then ``rebuild_outputs`` alone on each model's outputs (min of 5 x 20000).

    flock /work/wt/.bench.lock .venv/bin/python docs/results/usermodels/break43_f1/ab_rebuild.py
"""

from __future__ import annotations

import os
import statistics
import time
import timeit

import torch
from torch.utils import _pytree as pytree

import modelgraph.pytree_io as pytree_io
from modelgraph.out_layout import as_callers
from ue_client import CoinferClient

AFTER = pytree_io.rebuild_outputs


def before(io, values, layout=None):  # the previous body (commit 5fb8752a), Size nodes aside (none here)
    leaves = [values[leaf["t"]] if "t" in leaf else leaf["c"] for leaf in io.out_leaves]
    if layout:
        leaves = layout.apply(leaves, values)
    leaves = as_callers(leaves, [("t" in leaf) for leaf in io.out_leaves],
                        [values.get(leaf["t"]) for leaf in io.in_leaves if "t" in leaf])
    return pytree.tree_unflatten(leaves, io.out_spec)


def main() -> None:
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, 1 thread, load {load:.1f}; local client call, median ms [quartiles]")
    for spec in ("torchvision:resnet18", "torchvision:mobilenet_v2"):
        c = CoinferClient(spec)
        x = c.example_inputs
        times = {"before": [], "after": []}
        for r in range(63):
            for v in (("before", "after") if r % 2 else ("after", "before")):
                pytree_io.rebuild_outputs = before if v == "before" else AFTER
                t = time.perf_counter()
                with torch.no_grad():
                    c(*x)
                if r >= 3:
                    times[v].append((time.perf_counter() - t) * 1e3)
        pytree_io.rebuild_outputs = AFTER
        print(spec, f"(out_layout: {c.graph.out_layout})")
        for v, ts in times.items():
            q1, _, q3 = statistics.quantiles(ts, n=4)
            print(f"  {v:<7} {statistics.median(ts):7.2f} [{q1:.2f} {q3:.2f}]")
        g = c.graph
        values = {**g.bind(x, {}), **{o: torch.randn(2, 3) for o in g.outputs}}
        for name, f in (("before", before), ("after", AFTER)):
            best = min(timeit.repeat(lambda f=f, g=g, values=values: f(g.io, values, g.out_layout),
                                     number=20000, repeat=5))
            print(f"  rebuild_outputs alone, {name}: {best / 20000 * 1e6:.2f} us")


if __name__ == "__main__":
    main()
