"""ARA's planning in a child process (``edge_server.plan_process``; session 12 left: every planner CPU
second ran in the server process under its GIL, beside the victim's compute).

- The child's decision equals the in-process planner's on the same inputs (``partitioner.allocation.ara``):
  shares, each UE's partition, objective, uplink rule and predictions, over several session mixes
  (chains and random DAGs, cold and warm, send-rate caps, weights, three policies).
- A planner child that crashes or hangs does not stop serving: its plan fails within the deadline, the
  session holds the equal share, a victim's requests are served and equal the model's own output.
- The child ends with the server (no orphan process).
- The deadlines (session 14): a runaway child is killed at its CPU budget, a hung one when it stops
  progressing; a starved honest one (a real cgroup quota far below its need) is not killed for the load.

Real server on port 0 and real clients where a server is involved.
"""

from __future__ import annotations

import sys
import time

import grpc
import psutil
import pytest
import torch

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.plan_process import ChildPlanner, PlannerFailed
from edge_server.testing import ServerThread
from modelgraph import zoo
from partitioner import Link, chain
from partitioner.allocation import UeProblem, ara, bounded_graph
from partitioner.state import ServerState
from partitioner.synthetic import random_dag
from tests.waiting import wait_until
from ue_client import CoinferClient, new_tenant, wire
from ue_client.session import SessionStream

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB)
GRAPH = chain([(40.0, 2.0, 4_000, 200_000)] * 30, input_bytes=4_000).to_json()

_READY = "import struct, sys, time; sys.stdout.buffer.write(struct.pack('<I', 15) + b'{\"ready\": true}'); "
CRASH = [sys.executable, "-c", _READY + "sys.stdout.flush(); sys.stdin.buffer.read(4); sys.exit(3)"]
"""A child that starts, takes a job and dies."""
HANG = [sys.executable, "-c", _READY + "sys.stdout.flush(); sys.stdin.buffer.read(4); time.sleep(600)"]
"""A child that starts, takes a job and never answers."""
SPIN = [sys.executable, "-c", _READY + "sys.stdout.flush(); sys.stdin.buffer.read(4)\nwhile True: pass"]
"""A child that starts, takes a job and computes forever (a runaway plan)."""


def _mixes() -> list[tuple[str, list[UeProblem]]]:
    """Session mixes: (policy, problems)."""
    g1 = chain([(30.0, 3.0, 20_000, 400_000)] * 12, input_bytes=60_000)
    g2 = chain([(5.0, 1.0, 200_000, 50_000)] * 8, input_bytes=150_000)
    d1, d2, d3 = random_dag(3, 24), random_dag(7, 40, "branches"), random_dag(11, 30, "random")
    fast, slow = Link(50.0, 100.0, 10.0), Link(5.0, None, 40.0)
    return [
        ("dads", [UeProblem("a", g1, fast), UeProblem("b", g2, slow, weight=2.0)]),
        ("neurosurgeon", [UeProblem("a", d1, fast), UeProblem("b", d2, slow), UeProblem("c", d3, fast, send_mbps=2.0)]),
        ("mjoa", [UeProblem("a", g1, slow, state=ServerState.warm(g1)), UeProblem("b", d1, fast, weight=0.5)]),
        ("dads", [UeProblem(f"u{i}", random_dag(20 + i, 16), Link(10.0 * (i + 1), None, 5.0), weight=1.0 + i / 4,
                            send_mbps=4.0 * i) for i in range(4)]),
        ("mjoa", [UeProblem("a", d3, fast, state=ServerState(held=frozenset(list(d3.weights)[:3])))]),
        ("dads", [UeProblem("big", bounded_graph(random_dag(5, 300, "chain"), 300)[0], fast),  # contracted
                  UeProblem("whole", bounded_graph(random_dag(6, 2000), 100)[0], slow)]),
    ]


def test_the_childs_decision_equals_the_in_process_planners_on_the_same_inputs() -> None:
    """Several session mixes. mjoa's search is bounded by wall time (``budget_s``, 0.2 s in ARA by default):
    on a loaded machine one process may cut it where the other does not (seen: the same final shares, another
    accepted step), so it gets a budget it never meets here: the inputs are then the same."""
    planner = ChildPlanner(nice=0)
    try:
        for policy, problems in _mixes():
            opts = {"budget_s": 600.0} if policy == "mjoa" else None
            want = ara(problems, policy=policy, policy_options=opts)
            got = planner(problems, policy=policy, max_rounds=10, policy_options=opts)
            assert got.shares == want.shares, policy
            assert {u: p.server_ops for u, p in got.plans.items()} == {u: p.server_ops for u, p in want.plans.items()}
            assert got.objective_ms == want.objective_ms and got.history == want.history
            assert got.uplink_rule == want.uplink_rule and got.predicted_ms == want.predicted_ms
        assert planner.children_started == 1 and planner.failures == 0 and planner.cpu_s > 0
    finally:
        pid = planner.pid
        planner.close()
    assert pid is not None and not psutil.pid_exists(pid)


@pytest.mark.parametrize("command", [CRASH, HANG], ids=["crash", "hang"])
def test_a_failed_plan_raises_within_the_deadline_and_the_next_plan_starts_another_child(command) -> None:
    planner = ChildPlanner(command=command, deadline_s=1.0)
    problems = _mixes()[0][1]
    for k in (1, 2):
        t = time.monotonic()
        with pytest.raises(PlannerFailed):
            planner(problems, policy="dads")
        assert time.monotonic() - t < 30  # the deadline (1 s) bounds it; generous for a loaded machine
        assert planner.children_started == k and planner.pid is None  # killed, replaced at the next plan
    planner.close()
    with pytest.raises(PlannerFailed):
        planner(problems, policy="dads")
    assert planner.children_started == 2


def test_a_runaway_plan_is_killed_at_its_cpu_budget_not_by_the_wall_clock() -> None:
    """A child that computes forever is runnable all the time, so only the CPU budget can end it: the
    stall deadline (1 s) never applies to it and the wall cap is out of reach (600 s)."""
    planner = ChildPlanner(command=SPIN, deadline_s=1.0, cpu_budget_s=0.5, max_wall_s=600.0)
    try:
        with pytest.raises(PlannerFailed, match=r"over its budget of 0\.5 s"):
            planner(_mixes()[0][1], policy="dads")
        assert planner.failures == 1 and planner.pid is None and planner.cpu_s >= 0.5
    finally:
        planner.close()


def test_a_hung_plan_is_killed_when_it_stops_progressing() -> None:
    planner = ChildPlanner(command=HANG, deadline_s=0.5, cpu_budget_s=60.0, max_wall_s=600.0)
    try:
        with pytest.raises(PlannerFailed, match=r"made no progress for 0\.5 s"):
            planner(_mixes()[0][1], policy="dads")
        assert planner.pid is None
    finally:
        planner.close()


def test_the_wall_cap_ends_a_plan_that_progresses_forever() -> None:
    planner = ChildPlanner(command=SPIN, deadline_s=0.5, cpu_budget_s=600.0, max_wall_s=1.0)
    try:
        with pytest.raises(PlannerFailed, match="no answer within 1 s of wall time"):
            planner(_mixes()[0][1], policy="dads")
    finally:
        planner.close()


def test_bad_deadlines_are_refused() -> None:
    for kw in ({"deadline_s": 0}, {"cpu_budget_s": 0}, {"cpu_budget_s": float("inf")},
               {"deadline_s": 2.0, "max_wall_s": 1.0}, {"deadline_s": float("nan")}):
        with pytest.raises(ValueError):
            ChildPlanner(**kw)


def test_a_starved_honest_plan_is_not_killed_for_the_load() -> None:
    """The real planner child, moved into a cgroup with 6 % of a core (the testbed's ``CpuCgroup``), plans a
    mjoa mix that needs ~0.1 CPU s: seconds of wall time, several times the stall deadline (0.5 s), while the
    child is runnable (throttled) nearly all along. Session 13's rule (the deadline in wall time) killed
    it; now it answers, and the answer equals the in-process planner's."""
    from testbed.cgroups import CgroupError, CpuCgroup, detect_cgroups

    support = detect_cgroups()
    if not support.usable:
        pytest.skip(f"no writable cgroup CPU controller: {support.reason}")
    policy, problems = _mixes()[4]
    opts = {"budget_s": 600.0}  # mjoa's own wall budget out of reach: the inputs are the same as in process
    want = ara(problems, policy=policy, policy_options=opts)
    planner = ChildPlanner(nice=0, deadline_s=0.5, cpu_budget_s=60.0, max_wall_s=600.0)
    try:
        planner.prestart()  # the interpreter's start at full speed; the plan is what starves
        assert planner.pid is not None
        try:
            cg = CpuCgroup(f"cfr-{planner.pid}-starve", 0.06, support=support)  # ~2 s (3 %: ~4 s)
        except CgroupError as e:
            pytest.skip(f"cannot create a cgroup here: {e}")
        with cg:
            cg.add_pid(planner.pid)
            t = time.monotonic()
            got = planner(problems, policy=policy, max_rounds=10, policy_options=opts)
            took = time.monotonic() - t
            throttled = cg.throttle_stats().get("nr_throttled", 0)
            cg.set_cpus(None)
        assert took > planner.deadline_s and throttled > 0, (took, throttled)  # it did starve past the deadline
        assert planner.failures == 0
        assert got.shares == want.shares and got.objective_ms == want.objective_ms
        assert {u: p.server_ops for u, p in got.plans.items()} == {u: p.server_ops for u, p in want.plans.items()}
    finally:
        planner.close()


@pytest.mark.parametrize("command", [CRASH, HANG], ids=["crash", "hang"])
def test_a_planner_child_that_crashes_or_hangs_does_not_stop_serving(command) -> None:
    """The profiled sessions' joins fail (the child dies, or is killed at its deadline): nothing is
    published, each holds the equal share, and an offloading victim's requests are answered by the server
    and equal the model's own output."""
    alloc = AraShareAllocator(policy="dads", plan_command=command, plan_deadline_s=1.0)
    with ServerThread(config=CFG, allocator=alloc) as srv:
        model, inputs = zoo.chain()
        client = CoinferClient(model, inputs, server=srv.address, policy="offload",
                               link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant())
        try:
            ch = grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1)])
            s = SessionStream(wire.stub(ch), "other", "m", profile=wire.UeProfile(GRAPH, 20.0, 5.0))
            assert alloc.wait_idle(120)
            assert alloc.failed_plans >= 1 and alloc._phis == {}
            with torch.no_grad():
                want = model(*inputs)
            for _ in range(3):
                out = client(*inputs)
                assert not client.reports[-1].fallback, client.reports[-1]
                torch.testing.assert_close(out, want, rtol=0, atol=0)
            shares = alloc.shares()
            assert len(shares) == 2 and all(v == pytest.approx(0.5) for v in shares.values()), shares
            s.close()
            ch.close()
        finally:
            client.close()
    assert alloc.child.pid is None


def _plan_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "edge_server.plan_child" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_the_planner_child_ends_with_the_server() -> None:
    """(At niceness 0: at +10 beside a load of 12 on 2 cores the child's start and first plan took over
    30 s, its deadline; what the niceness buys is bench_profile_flood's to show.)"""
    alloc = AraShareAllocator(policy="dads", plan_nice=0)
    with ServerThread(config=CFG, allocator=alloc) as srv:
        ch = grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            s = SessionStream(wire.stub(ch), "t", "m", profile=wire.UeProfile(GRAPH, 20.0, 5.0))
            assert alloc.wait_idle(120)
            assert alloc.replans >= 1 and alloc.failed_plans == 0 and s.opened.session_id in alloc._phis
            pid = alloc.child.pid
            assert pid is not None and psutil.pid_exists(pid)
            assert pid in [p.pid for p in _plan_children()]
        finally:
            ch.close()
    # (other tests' allocators built without a server end their children when collected: only this one's counts)
    wait_until(lambda: pid not in [p.pid for p in _plan_children()], timeout=10)
    assert alloc.child.pid is None
