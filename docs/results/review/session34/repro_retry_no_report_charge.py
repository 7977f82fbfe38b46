"""Review repro (session 34, af75f918): a re-plan stopped at a limit before any progress report, whose
retry without the heavy identity's sessions succeeds, charges the whole failed attempt to the causer.

_run_job's split "by problem size when none came" (``elif not work and self._job_sizes``) is only reached
when ``self._ara.allocation is alloc0``; a successful retry publishes a new allocation, so ``work`` is only
the retry's ``work_s`` (which no longer holds the dropped heavy sessions) and the failed attempt's CPU
(here 5 s) lands on the honest joiner's own bucket; the heavy identity's passive bucket gets ~0.

Run: .venv/bin/python docs/results/review/session34/repro_retry_no_report_charge.py
"""

from __future__ import annotations

from edge_server.allocation import AraShareAllocator, SessionInfo
from edge_server.plan_process import PlannerFailed
from partitioner import chain
from partitioner.allocation import SubproblemCache, ara
from partitioner.synthetic import random_dag
from protos.values import UeProfile

HONEST = chain([(3.0, 0.3, 20_000, 400_000)] * 10, input_bytes=60_000).to_json()
BIG = random_dag(1, 120, "random").to_json()


def _info(sid: str, key: str, graph: str) -> SessionInfo:
    i = SessionInfo(sid, key, "m", planner_key=key)
    i.extra["profile"] = UeProfile(cost_graph_json=graph, uplink_mbps=50.0, rtt_ms=5.0)
    return i


class FakeChild:
    """Stands in for ChildPlanner: 'fail' = stopped at its CPU budget (5 CPU s) before any progress report."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.closed = False
        self.fail_next = False
        self.cache = SubproblemCache()

    def __call__(self, problems, *, policy="mjoa", max_rounds=10, policy_options=None, frozen=frozenset()):
        if self.fail_next:
            self.fail_next = False
            self.cpu_s += 5.0
            raise PlannerFailed("a plan used 5.00 CPU s, over its budget", over_limit=True)  # work_s = {}
        self.cpu_s += 0.01
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
    alloc.on_join(_info("big", "att", BIG))
    own0, pas0 = dict(alloc.plan_cpu_s), dict(alloc.passive_cpu_s)
    fake.fail_next = True
    alloc.on_join(_info("hon", "hon", HONEST))
    honest = alloc.plan_cpu_s.get("hon", 0.0) - own0.get("hon", 0.0)
    att_passive = alloc.passive_cpu_s.get("att", 0.0) - pas0.get("att", 0.0)
    print(f"dropped_heavy={alloc.dropped_heavy} failed_plans={alloc.failed_plans}")
    print(f"honest own charge {honest:.2f} CPU s, attacker passive {att_passive:.2f} CPU s")
    print(f"honest tokens now {alloc.budgets.tokens('hon'):.2f}")
    assert alloc.dropped_heavy == 1
    if honest > 4.0 and att_passive < 1.0:
        print("BUG: the failed attempt's 5 CPU s went to the causer (no split by problem size after a good retry)")
    else:
        print("ok: the failed attempt was split by problem size")


if __name__ == "__main__":
    main()
