"""Decision time of OnlineTable.decide, cold, plain vs shared (send CPU), on the captured profiles, states with
part of the model held and one weight in flight (as after a prefetch)."""
import json, random, statistics, sys, time
from partitioner import CostGraph, Link
from partitioner.online import precompute
from partitioner.prep import prepare
from partitioner.simulate import Rates
from partitioner.uecpu import effective_rates
from ue_client import planning
from ue_client.planning import prefetched_state
out = {}
for name in ("resnet18", "mobilenet_v2"):
    g = CostGraph.from_json(f"tests/data/costgraphs/{name}.json")
    P = prepare(g); table = precompute(g)
    sc = planning._scorer(g, Link(400.0, rtt_ms=20.0), None, None, None, True)
    order = sc.weight_order(frozenset(o.name for o in g.ops))
    W = sum(g.weights[w] for w in order)
    rng = random.Random(1)
    plain, shared = [], []
    for i in range(200):
        link = Link(rng.choice([20.0, 100.0, 400.0]), rtt_ms=20.0)
        r = Rates.of(link)
        s = 10 ** rng.uniform(-6, -4.5)
        st = prefetched_state(None, [(w, g.weights[w]) for w in order], rng.uniform(0, 1) * W)
        t = time.perf_counter(); table.decide(P, effective_rates(r, s), st, "cold"); plain.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter(); table.decide(P, r, st, "cold", send_ms_per_byte=s); shared.append((time.perf_counter() - t) * 1e3)
    q = lambda v, p: sorted(v)[int(p * (len(v) - 1))]
    out[name] = {"plain_median_ms": statistics.median(plain), "plain_p99_ms": q(plain, 0.99),
                 "shared_median_ms": statistics.median(shared), "shared_p99_ms": q(shared, 0.99)}
    print(name, {k: round(v, 3) for k, v in out[name].items()})
json.dump(out, open(sys.argv[1], "w"), indent=1)
