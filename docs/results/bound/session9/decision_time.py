"""Added decision cost of the prefetch evaluation: ``planning.choose("auto")`` CPU ms (``time.thread_time``),
median and p99 over 60 calls per graph, with and without ``_prefetch_best`` (monkeypatched to None), on
synthetic graphs. ``PYTHONPATH=. python docs/results/bound/session9/decision_time.py OUT.json``"""

import json
import statistics
import sys
import time

from partitioner import Link
from partitioner.synthetic import random_dag
from partitioner.uecpu import UeCpu
from ue_client import planning


def main(path: str) -> None:
    orig = planning._prefetch_best
    out = {}
    for n, kind in ((70, "heavy_tail"), (200, "heavy_tail"), (200, "random"), (430, "residual")):
        g = planning.scaled_ue(random_dag(7, n, kind), 30.0)
        link, cpu = Link(uplink_mbps=400.0, rtt_ms=20.0), UeCpu(8e-6)
        planning.choose("auto", g, link, ue_cpu=cpu, horizon=8)  # builds the online table
        res = {}
        for label, fn in (("with prefetch", orig), ("without", lambda *a, **k: None)):
            planning._prefetch_best = fn
            ts = []
            for _ in range(60):
                t0 = time.thread_time()
                c = planning.choose("auto", g, link, ue_cpu=cpu, horizon=8)
                ts.append((time.thread_time() - t0) * 1e3)
            ts.sort()
            res[label] = {"median_ms": statistics.median(ts), "p99_ms": ts[int(0.99 * (len(ts) - 1))],
                          "prefetch": c.prefetch, "invest": c.invest}
        planning._prefetch_best = orig
        out[f"{kind}-{n}"] = res
        print(kind, n, res)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
