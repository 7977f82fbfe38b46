"""Random cost graphs for property tests and benchmarks: chains, fork/join branches, multi-consumer
outputs, shared weights, weight-heavy tails, pinned ops. Deterministic for a given seed."""

from __future__ import annotations

import random

from partitioner.costgraph import CostGraph, OpCost

KINDS = ("chain", "branches", "random", "residual", "heavy_tail")


def random_dag(seed: int, n: int, kind: str | None = None, *, speedup: float | None = None,
               pinned_prob: float = 0.0, samples: int = 0) -> CostGraph:
    """A random ``n``-op graph of the given kind (random kind when None)."""
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    sp = speedup if speedup is not None else rng.choice([1.0, 3.0, 10.0, 30.0])
    names = [f"v{i}" for i in range(n)]
    preds: list[list[str]] = []
    for i in range(n):
        if i == 0:
            preds.append(["x"])
            continue
        if kind == "chain" or kind == "heavy_tail":
            preds.append([names[i - 1]])
        elif kind == "random":
            k = rng.choice([1, 1, 1, 2, 2, 3])
            ps = rng.sample(names[max(0, i - 6):i], min(k, i))
            if rng.random() < 0.1:
                ps.append("x")
            preds.append(sorted(set(ps)))
        else:  # branches / residual: fork-join blocks over a backbone
            if rng.random() < 0.35 and i >= 2:
                back = rng.randint(2, min(i, 5))
                preds.append(sorted({names[i - 1], names[i - back]}))
            else:
                preds.append([names[i - 1]])
    weights: dict[str, int] = {}
    ops = []
    for i in range(n):
        a = rng.uniform(0.05, 5.0) if rng.random() > 0.1 else 0.0
        c = a / sp * rng.uniform(0.5, 1.5)
        d = int(10 ** rng.uniform(3, 6.3))
        ws: list[str] = []
        if rng.random() < 0.75:
            heavy = kind == "heavy_tail" and i >= n * 0.6
            wb = int(10 ** rng.uniform(5.5, 7.5) if heavy else 10 ** rng.uniform(3, 6.5))
            weights[f"w{i}"] = wb
            ws.append(f"w{i}")
        if weights and rng.random() < 0.1:  # shared weight (tied embedding style)
            ws.append(rng.choice(sorted(weights)))
        var_a = (a * rng.uniform(0.0, 0.3)) ** 2
        ops.append(OpCost(name=names[i], inputs=tuple(preds[i]), weights=tuple(dict.fromkeys(ws)),
                          out_bytes=d, ue_ms=a, ue_var=var_a, server_ms=c, server_var=(c * 0.1) ** 2,
                          offloadable=not (pinned_prob and rng.random() < pinned_prob)))
    outs = [names[-1]]
    if n > 3 and rng.random() < 0.3:
        outs.append(names[rng.randrange(n - 1)])
    ue_samples = None
    if samples:
        rows = []
        shared = [rng.gauss(0, 1) for _ in range(samples)]
        for op in ops:
            s = op.ue_var ** 0.5
            rows.append(tuple(max(0.0, op.ue_ms + s * (0.7 * shared[r] + 0.7 * rng.gauss(0, 1)))
                              for r in range(samples)))
        ue_samples = tuple(rows)
    return CostGraph(ops=tuple(ops), inputs={"x": int(10 ** rng.uniform(4, 6.5))}, outputs=tuple(outs),
                     weights=weights, model=f"synthetic-{kind}-{n}-{seed}", model_hash=f"syn{seed}-{n}-{kind}",
                     ue_samples_ms=ue_samples)
