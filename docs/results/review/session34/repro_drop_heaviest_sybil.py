"""Review repro (session 34, af75f918), logic only: ``_drop_heaviest`` compares work per identity, and without
--auth-tokens every connection is its own identity ("peer:<ip:port>"). A client whose sessions come over several
connections, and whose own join's re-plan is stopped at the CPU budget, gets the honest identity (one session, the
most work of any single identity) dropped from ARA, though the attacker's sessions did 2.8 of the 3.9 CPU s.
(Whether an attacker can push a re-plan over the budget this way on a real server was not measured.)

Run: .venv/bin/python docs/results/review/session34/repro_drop_heaviest_sybil.py
"""

from __future__ import annotations

from edge_server.allocation import AraShareAllocator, SessionInfo
from edge_server.plan_process import PlannerFailed
from partitioner import chain
from partitioner.allocation import SubproblemCache, ara
from protos.values import UeProfile

G = chain([(3.0, 0.3, 20_000, 400_000)] * 8, input_bytes=60_000).to_json()


def _info(sid: str, key: str) -> SessionInfo:
    i = SessionInfo(sid, key, "m", planner_key=key)
    i.extra["profile"] = UeProfile(cost_graph_json=G, uplink_mbps=50.0, rtt_ms=5.0)
    return i


class FakeChild:
    def __init__(self) -> None:
        self.cpu_s, self.closed, self.fail_next, self.cache = 0.0, False, False, SubproblemCache()

    def __call__(self, problems, *, policy="mjoa", max_rounds=10, policy_options=None, frozen=frozenset()):
        if self.fail_next:
            self.fail_next = False
            self.cpu_s += 4.0
            e = PlannerFailed("a plan used 4.00 CPU s, over its budget", over_limit=True)
            e.work_s = {"h1": 1.0, "s1": 0.9, "s2": 0.9, "s3": 0.9, "s4": 0.1}
            raise e
        return ara(
            problems,
            policy=policy,
            max_rounds=max_rounds,
            policy_options=policy_options,
            cache=self.cache,
            frozen=frozen,
        )

    def close(self) -> None:
        self.closed = True


def main() -> None:
    alloc = AraShareAllocator(policy="neurosurgeon", background=False, planner="inline")
    fake = FakeChild()
    alloc.child = fake
    alloc._ara.planner = fake
    alloc.on_join(_info("h1", "peer:honest"))
    for i in (1, 2, 3):
        alloc.on_join(_info(f"s{i}", f"peer:10.0.0.9:{4000 + i}"))
    fake.fail_next = True
    alloc.on_join(_info("s4", "peer:10.0.0.9:4004"))
    print(f"in ARA now: {sorted(alloc._in_ara)}; dropped_heavy={alloc.dropped_heavy}")
    if "h1" not in alloc._in_ara:
        print(
            "the honest session was dropped (equal share until its next profile update); the other connections' "
            "sessions stay planned"
        )


if __name__ == "__main__":
    main()
