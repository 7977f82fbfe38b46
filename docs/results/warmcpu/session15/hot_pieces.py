"""Hot CPU (us per call, ``time.thread_time``, 20,000 calls after 100) of auto's per-request pieces after a warm
split request, and of one re-plan of a held warm target (search vs ``DecisionCache.held_answer``) on the test
cost graphs: ``PYTHONPATH=. python docs/results/warmcpu/session15/hot_pieces.py``."""
import time
from pathlib import Path

from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState, Shares
from ue_client.calibration import CostModel, TransportMemory
from ue_client.decisions import DecisionCache


def tm(fn, n=20000):
    for _ in range(100):
        fn()
    t = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - t) / n * 1e6


mem = TransportMemory()
a, b = CostModel(memory_key=("a", 1), memory=mem), CostModel()
print(f"calibrate_transport with TransportMemory {tm(lambda: a.calibrate_transport(5.0, 1.0)):.2f} us, "
      f"without {tm(lambda: b.calibrate_transport(5.0, 1.0)):.2f}")
print(f"calibrate_server with TransportMemory {tm(lambda: a.calibrate_server(30.0, 20.0, 1.0)):.2f} us, "
      f"without {tm(lambda: b.calibrate_server(30.0, 20.0, 1.0)):.2f}")
dc0 = DecisionCache("auto", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=None)
held_choice = type("C", (), {"invest": False, "details": {"target_warm_ms": 40.0}})()
print(f"DecisionCache.account {tm(lambda: dc0.account(held_choice, 50.0)):.2f} us")
def replan_us(g: CostGraph, shortcut: bool) -> tuple[float, str]:
    """Hot us of one re-plan of a held warm target (the server scale past its drift threshold, back and forth)."""
    link = Link(400.0, rtt_ms=5.0)
    held = ServerState(held=frozenset(g.weights))
    dc = DecisionCache("auto", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=None,
                       held_shortcut=shortcut)
    base = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0}
    dc.decide(ServerState(), Shares(), costs=g, base=g, link=link, ue_cpu=None, scale=base, n=0)
    dc.decide(held, Shares(), costs=g, base=g, link=link, ue_cpu=None, scale=base, n=1)
    k = [1]

    def flip():
        k[0] += 1
        s = {**base, "server": 1.0 if k[0] % 2 else 1.5}
        return dc.decide(held, Shares(), costs=lambda: g.scaled(server=s["server"]), base=g, link=link,
                         ue_cpu=None, scale=s, n=k[0])
    return tm(flip, 2000), flip().details["plan_why"]


for name in ("resnet18", "mobilenet_v2"):
    g = CostGraph.from_json(Path("tests/data/costgraphs") / f"{name}.json").scaled(ue=10.0)
    out = {shortcut: replan_us(g, shortcut) for shortcut in (False, True)}
    print(f"{name}: a held target's re-plan, search {out[False][0]:.1f} us ({out[False][1]}), "
          f"held_answer {out[True][0]:.1f} us ({out[True][1]})")
