"""Decision time of ``OnlineTable.decide``, cold, plain vs shared (the send CPU), on the captured profiles, with part
of the model's need order held and one weight in flight (as after a prefetch). Run from the repository root:
``python docs/results/prefix/session17/dec_bench.py OUT.json`` (under the bench lock)."""

import json
import random
import statistics
import sys
import time

from partitioner import CostGraph, Link
from partitioner.online import precompute
from partitioner.prep import prepare
from partitioner.simulate import Rates
from partitioner.uecpu import effective_rates
from ue_client import planning
from ue_client.planning import prefetched_state


def quantile(v: list[float], p: float) -> float:
    return sorted(v)[int(p * (len(v) - 1))]


def main(out_path: str) -> None:
    out = {}
    for name in ("resnet18", "mobilenet_v2"):
        g = CostGraph.from_json(f"tests/data/costgraphs/{name}.json")
        P, table = prepare(g), precompute(g)
        sc = planning._scorer(g, Link(400.0, rtt_ms=20.0), None, None, None, True)
        order = sc.weight_order(frozenset(o.name for o in g.ops))
        total = sum(g.weights[w] for w in order)
        rng = random.Random(1)
        plain, shared = [], []
        for _ in range(200):
            r = Rates.of(Link(rng.choice([20.0, 100.0, 400.0]), rtt_ms=20.0))
            s = 10 ** rng.uniform(-6, -4.5)
            st = prefetched_state(None, [(w, g.weights[w]) for w in order], rng.uniform(0, 1) * total)
            t = time.perf_counter()
            table.decide(P, effective_rates(r, s), st, "cold")
            plain.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            table.decide(P, r, st, "cold", send_ms_per_byte=s)
            shared.append((time.perf_counter() - t) * 1e3)
        out[name] = {"plain_median_ms": statistics.median(plain), "plain_p99_ms": quantile(plain, 0.99),
                     "shared_median_ms": statistics.median(shared), "shared_p99_ms": quantile(shared, 0.99)}
        print(name, {k: round(v, 3) for k, v in out[name].items()})
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
