"""Reproduction (session 14, attack14): an idle tenant's large cost graph makes an honest tenant's ARA
re-plans expensive, and the honest identity is charged for them (``edge_server.allocation``'s ``_charge``
charges the identity that caused a re-plan the whole re-plan, which plans every profiled session).

``PYTHONPATH=$PWD python docs/results/attack/session14/ara_charge_repro.py``: prints the planner CPU seconds
the honest join was charged, alone and beside the idle 700-op graph, and the honest identity's bucket after.
"""

import grpc

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner import chain
from partitioner.synthetic import random_dag
from ue_client import wire
from ue_client.session import SessionStream

HONEST = chain([(3.0, 0.3, 20_000, 400_000)] * 69, input_bytes=60_000).to_json()
BIG = random_dag(1, 700, "random").to_json()


def conn(srv) -> grpc.Channel:
    """A channel with its own TCP connection (one planner identity per peer without --auth-tokens)."""
    return grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1),
                                                       ("grpc.max_send_message_length", 64 << 20)])


def main() -> None:
    for with_attacker in (False, True):
        alloc = AraShareAllocator(policy="mjoa")
        with ServerThread(config=ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB), allocator=alloc) as srv:
            chans, streams, before = [], [], {}
            if with_attacker:
                chans.append(conn(srv))
                streams.append(SessionStream(wire.stub(chans[-1]), "attacker", "m",
                                             profile=wire.UeProfile(BIG, 50.0, 5.0)))
                assert alloc.wait_idle(300)
                before = dict(alloc.plan_cpu_s)
            chans.append(conn(srv))
            streams.append(SessionStream(wire.stub(chans[-1]), "honest", "m",
                                         profile=wire.UeProfile(HONEST, 50.0, 5.0)))
            assert alloc.wait_idle(300)
            after = dict(alloc.plan_cpu_s)
            delta = {k[-24:]: round(v - before.get(k, 0.0), 3) for k, v in after.items() if v != before.get(k, 0.0)}
            bucket = {k[-24:]: round(alloc.budgets.tokens(k), 2) for k in after if k not in before}
            print("attacker present" if with_attacker else "honest alone", "| CPU s charged by the honest join:",
                  delta, "| honest bucket now", bucket)
            for s in streams:
                s.close()
            for c in chans:
                c.close()


if __name__ == "__main__":
    main()
