"""break44 F2: a re-plan that fails (the planner child killed past its 10 CPU s per plan) is charged whole to
the identity whose join caused it, though nearly all of it was other identities' subproblems; those
identities' passive buckets are charged nothing, so their sessions are never frozen, and every later join
beside them fails the same way.

Real server in-process on port 0 with --auth-tokens (att, hon1, hon2), ARA (mjoa, planner child, its defaults).
att opens ATT sessions, each a 700-op random DAG (idle: no requests), one after another, waiting for each
plan. Then hon1 and hon2, each one session with a 69-op chain (an honest small model), join one after the
other. Printed per join: whether ARA planned it, the CPU s charged to the joiner's own bucket, att's own and
passive charges, the global bucket, how long the joiner waited for its plan, and the next wait of hon1.
Run: .venv/bin/python docs/results/attack/session34/break44/f2_failed_plan_charge.py [--att 2]
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


def state(alloc, who: str) -> str:
    k = f"tenant:{who}"
    return (
        f"{who} own {alloc.plan_cpu_s.get(k, 0):.2f} passive {alloc.passive_cpu_s.get(k, 0):.2f} "
        f"bucket {alloc.budgets.tokens(k):.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--att", type=int, default=2)
    ap.add_argument("--ops", type=int, default=700)
    ap.add_argument("--honest", type=int, default=2)
    a = ap.parse_args()
    names = ["att"] + [f"hon{i + 1}" for i in range(a.honest)]
    tok = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115
    json.dump({"tenants": {n: {"token": f"{n}-token-xyz", "quota": {"sessions": 16}} for n in names}}, tok)
    tok.close()
    alloc = AraShareAllocator(policy="mjoa")
    cfg = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB, auth_tokens_file=tok.name)
    print(f"# {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}", flush=True)
    opened = []
    with ServerThread(config=cfg, allocator=alloc) as srv:
        for i in range(a.att):
            s = RawSession(channel(srv.address), "att-token-xyz")
            t = time.monotonic()
            s.open(tenant="att", graph_json=random_dag(i + 1, a.ops, "random").to_json())
            opened.append(s)
            assert alloc.wait_idle(600)
            print(
                f"att session {i} joined in {time.monotonic() - t:.1f} s; failed plans {alloc.failed_plans}; "
                f"{state(alloc, 'att')}; global {alloc.budgets.tokens(GLOBAL_KEY):.2f}",
                flush=True,
            )
        for n in names[1:]:
            f0 = alloc.failed_plans
            s = RawSession(channel(srv.address), f"{n}-token-xyz")
            t = time.monotonic()
            s.open(tenant=n, graph_json=HONEST)
            opened.append(s)
            sid = s.opened.session_id
            assert alloc.wait_idle(600)
            planned = sid in alloc._ara
            print(
                f"{n} joined: ARA {'planned' if planned else 'FAILED (equal share)'} after "
                f"{time.monotonic() - t:.1f} s, failed plans +{alloc.failed_plans - f0}; {state(alloc, n)}; "
                f"{state(alloc, 'att')}; global {alloc.budgets.tokens(GLOBAL_KEY):.2f}; "
                f"hon1's next re-plan waits {alloc.budgets.wait_s('tenant:hon1'):.0f} s",
                flush=True,
            )
        for s in opened:
            s.close()
    print(f"# {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
