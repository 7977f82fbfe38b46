"""Session 34: who pays for ARA's re-plans (README "Known limitations", "ARA planner CPU charged across
tenants"; session 14's ``ara_charge_repro.py``). Real server in-process on port 0, real clients, each
identity its own TCP connection (no --auth-tokens: one planner identity per peer), the planner child, mjoa.

Scenarios, each on a fresh server:

1. ``alone``: an honest 69-op chain joins an empty server.
2. ``beside big``: a 700-op random DAG joins and stays idle, then the honest chain joins.
3. ``churn``: beside the idle big graph, a tiny tenant (a 5-op chain) joins and leaves ``--cycles`` times,
   each on a new connection (a new identity).

Printed per scenario: what each identity's own bucket was charged (``plan_cpu_s``: the re-plans it caused)
and, where the code has it, what its passive bucket was charged (``passive_cpu_s``: its sessions'
subproblems in re-plans others caused), and the honest / big identity's bucket after. Run with
``PYTHONPATH=<tree> python docs/results/attack/session34/ara_charge_split.py``: the tree before session 34
(``git archive`` of the commit before it) and after, same machine, one after the other.
"""

import argparse
import os
import time

import grpc

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner import chain
from partitioner.synthetic import random_dag
from ue_client import wire
from ue_client.session import SessionStream

HONEST = chain([(3.0, 0.3, 20_000, 400_000)] * 69, input_bytes=60_000).to_json()
TINY = chain([(3.0, 0.3, 20_000, 400_000)] * 5, input_bytes=60_000).to_json()
BIG = random_dag(1, 700, "random").to_json()


def conn(srv) -> grpc.Channel:
    """A channel with its own TCP connection (one planner identity per peer without --auth-tokens)."""
    return grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1),
                                                       ("grpc.max_send_message_length", 64 << 20)])


def snap(alloc) -> tuple[dict, dict]:
    return dict(alloc.plan_cpu_s), dict(getattr(alloc, "passive_cpu_s", {}))


def delta(a: dict, b: dict, key: str) -> float:
    return round(b.get(key, 0.0) - a.get(key, 0.0), 3)


def open_session(srv, name: str, graph: str) -> tuple[grpc.Channel, SessionStream]:
    ch = conn(srv)
    return ch, SessionStream(wire.stub(ch), name, "m", profile=wire.UeProfile(graph, 50.0, 5.0))


def run(scenario: str, cycles: int) -> None:
    alloc = AraShareAllocator(policy="mjoa")
    with ServerThread(config=ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB), allocator=alloc) as srv:
        opened = []
        try:
            big_key = None
            if scenario != "alone":
                opened.append(open_session(srv, "big", BIG))
                assert alloc.wait_idle(300)
                big_key = alloc._tenant_of[opened[-1][1].opened.session_id]
                print(f"{scenario:10s} | big's join: own {alloc.plan_cpu_s.get(big_key, 0):.3f} CPU s")
            if scenario in ("alone", "beside big"):
                own0, pas0 = snap(alloc)
                opened.append(open_session(srv, "honest", HONEST))
                assert alloc.wait_idle(300)
                own1, pas1 = snap(alloc)
                hk = alloc._tenant_of[opened[-1][1].opened.session_id]
                line = (f"{scenario:10s} | honest join: honest charged {delta(own0, own1, hk):.3f} CPU s, "
                        f"honest bucket {alloc.budgets.tokens(hk):.2f}")
                if big_key is not None:
                    line += (f" | big charged own {delta(own0, own1, big_key):.3f}, "
                             f"passive {delta(pas0, pas1, big_key):.3f}")
                print(line, flush=True)
            else:
                for i in range(cycles):
                    own0, pas0 = snap(alloc)
                    ch, s = open_session(srv, "tiny", TINY)
                    assert alloc.wait_idle(300)
                    tk = alloc._tenant_of[s.opened.session_id]
                    s.close()
                    assert alloc.wait_idle(300)
                    ch.close()
                    own1, pas1 = snap(alloc)
                    print(f"{scenario:10s} | cycle {i}: tiny charged {delta(own0, own1, tk):.3f} | big charged own "
                          f"{delta(own0, own1, big_key):.3f}, passive {delta(pas0, pas1, big_key):.3f} | big bucket "
                          f"{alloc.budgets.tokens(big_key):.2f}, wait {alloc.budgets.wait_s(big_key):.1f} s",
                          flush=True)
        finally:
            for ch, s in opened:
                s.close()
                ch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=4)
    a = ap.parse_args()
    print(f"# {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.2f}, "
          f"tree {os.path.dirname(os.path.dirname(os.path.abspath(__import__('edge_server').__file__)))}", flush=True)
    for scenario in ("alone", "beside big", "churn"):
        run(scenario, a.cycles)
    print(f"# end {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
