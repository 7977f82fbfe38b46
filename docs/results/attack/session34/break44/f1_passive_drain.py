"""break44 F1 probe: a tenant whose profile updates cost it almost nothing makes another tenant's idle
graph pay (passive bucket), freezes its split, and drains the global planner bucket so a third tenant's
join waits.

Real server in-process on port 0 with --auth-tokens (3 tenants: vic, att, hon), ARA (mjoa, planner child).
vic opens one session with a 700-op random DAG and stays idle. att opens one session with a 5-op chain and
sends UPDATES profile updates on the Session stream that change only its uplink claim (graph kept), each a
new value. Printed: att's own charge, vic's passive charge, the global bucket, stale plans; then hon opens a
session with a 69-op chain and we time until its join is planned (allocator idle).
Run: .venv/bin/python docs/results/attack/session34/break44/f1_passive_drain.py [--updates 40]
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rawsession import RawSession, channel

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.planner_budget import GLOBAL_KEY
from edge_server.testing import ServerThread
from partitioner import chain
from partitioner.synthetic import random_dag

HONEST = chain([(3.0, 0.3, 20_000, 400_000)] * 69, input_bytes=60_000).to_json()
TINY = chain([(3.0, 0.3, 20_000, 400_000)] * 5, input_bytes=60_000).to_json()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--big", type=int, default=700)
    ap.add_argument("--victims", type=int, default=1)
    ap.add_argument("--att-sessions", type=int, default=1)
    ap.add_argument("--gap", type=float, default=0.05)
    ap.add_argument("--vary", choices=["uplink", "graph"], default="uplink")
    a = ap.parse_args()
    tenants = {"att": {"token": "att-token-1"}, "hon": {"token": "hon-token-1"}}
    for i in range(a.victims):
        tenants[f"vic{i}"] = {"token": f"vic{i}-token-1"}
    tok = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115
    json.dump({"tenants": tenants}, tok)
    tok.close()
    alloc = AraShareAllocator(policy="mjoa")
    cfg = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB, auth_tokens_file=tok.name)
    print(f"# load {os.getloadavg()[0]:.2f}", flush=True)
    with ServerThread(config=cfg, allocator=alloc) as srv:
        keep = []
        for i in range(a.victims):
            v = RawSession(channel(srv.address), f"vic{i}-token-1")
            v.open(tenant=f"vic{i}", graph_json=random_dag(i + 1, a.big, "random").to_json())
            keep.append(v)
            assert alloc.wait_idle(300)
        g0 = alloc.budgets.tokens(GLOBAL_KEY)
        vk = [f"tenant:vic{i}" for i in range(a.victims)]
        print(f"victims joined: own {[round(alloc.plan_cpu_s.get(k, 0), 3) for k in vk]}, global {g0:.2f}", flush=True)
        atts = []
        for _ in range(a.att_sessions):
            att = RawSession(channel(srv.address), "att-token-1")
            att.open(tenant="att", graph_json=TINY)
            atts.append(att)
            assert alloc.wait_idle(300)
        own0 = alloc.plan_cpu_s.get("tenant:att", 0.0)
        pas0 = {k: alloc.passive_cpu_s.get(k, 0.0) for k in vk}
        g0 = alloc.budgets.tokens(GLOBAL_KEY)
        print(f"att sessions joined: att own {own0:.3f}, victims passive {pas0}, global {g0:.2f}", flush=True)
        t0 = time.monotonic()
        for i in range(a.updates):
            if a.vary == "uplink":
                atts[0].profile(uplink=5.0 + 3.7 * i, send_mbps=0.0)
            else:  # a new graph each time: its server time differs
                k = 0.2 + 0.37 * i
                g = chain([(50.0, 2.0 * k, 1_000, 0)] * 5, input_bytes=1_000).to_json()
                atts[0].profile(graph_json=g)
            time.sleep(a.gap)
        assert alloc.wait_idle(600)
        dt = time.monotonic() - t0
        own = alloc.plan_cpu_s.get("tenant:att", 0.0) - own0
        pas = {k: round(alloc.passive_cpu_s.get(k, 0.0) - pas0[k], 3) for k in vk}
        print(
            f"after {a.updates} att updates in {dt:.1f} s: att own charged {own:.3f} CPU s (bucket "
            f"{alloc.budgets.tokens('tenant:att'):.2f}), victims' passive charged {pas}, global bucket "
            f"{alloc.budgets.tokens(GLOBAL_KEY):.2f} (was {g0:.2f}), stale plans {alloc.stale_plans}, "
            f"re-plans {alloc.replans}, deferred {alloc.deferred}",
            flush=True,
        )
        # third tenant joins
        t1 = time.monotonic()
        h = RawSession(channel(srv.address), "hon-token-1")
        h.open(tenant="hon", graph_json=HONEST)
        assert alloc.wait_idle(600)
        print(
            f"hon's join planned after {time.monotonic() - t1:.2f} s (global wait was "
            f"{alloc.budgets.wait_s('tenant:hon'):.2f} s now), charged {alloc.plan_cpu_s.get('tenant:hon', 0):.3f}",
            flush=True,
        )
        for s in [*keep, *atts, h]:
            s.close()
    print(f"# load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
