"""What a session's profile updates may cost ARA's planner thread (session 10 left: three sessions re-sending
10k-op graphs kept the planner busy back to back, holding the GIL beside every session's work, uncharged;
a victim's ~1 ms request took 789 ms median; the graph waiting in ARA's queue was outside ``--memory-mb``).

- Each tenant has a planner CPU bucket (``edge_server.allocation.PLAN_CPU_SHARE`` /
  ``PLAN_CPU_BURST_S``): a re-plan is charged the planner thread's CPU time; a tenant in debt has its next
  update planned only once the bucket is back (coalesced meanwhile: the latest wins), another tenant's
  update is not held up.
- The re-plan's CPU is counted in the session's fair turn on the compute scheduler
  (``ComputeScheduler.charge``): its next compute waits behind a tenant that is owed compute.
- A queued update's parsed graph keeps its reservation in the tenant's memory budget until the planner
  takes it (or a newer update replaces it, or the session ends).

A real server on port 0, real SessionStream clients.
"""

from __future__ import annotations

import threading
import time

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.scheduler import ComputeScheduler
from edge_server.testing import ServerThread
from partitioner import chain
from tests.waiting import wait_until
from ue_client import wire
from ue_client.session import SessionStream

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB)
GRAPH = chain([(40.0, 2.0, 4_000, 200_000)] * 300, input_bytes=4_000).to_json()


def _stream(srv, tenant: str) -> tuple:
    ch = wire.channel(srv.address)
    return ch, SessionStream(wire.stub(ch), tenant, "m", cell_uplink_mbps=20.0,
                             profile=wire.UeProfile(GRAPH, 20.0, 5.0))


def test_a_tenant_in_planner_debt_waits_and_is_charged_alone() -> None:
    """No burst, a refill of 0.1 CPU s per s: after its join tenant a is in debt, so the re-plan of each of
    its updates waits until a's bucket is back at 0 (updates arriving meanwhile coalesce): a's re-plans
    take at most 0.1 of the planner thread over the phase, and the latest update is planned in the end.
    Every re-plan is charged to the tenant that caused it: b's account does not move with a's updates."""
    share = 0.1
    alloc = AraShareAllocator(policy="neurosurgeon", plan_cpu_share=share, plan_cpu_burst_s=0.0)
    charges: list[float] = []
    charge = alloc._charge

    def record(sid, cpu_s):
        if alloc._tenant_of.get(sid) == "a":
            charges.append(cpu_s)
        charge(sid, cpu_s)

    alloc._charge = record
    with ServerThread(config=CFG, allocator=alloc) as srv:
        (cha, a), (chb, b) = _stream(srv, "a"), _stream(srv, "b")
        try:
            assert alloc.wait_idle(120)
            assert alloc.plan_cpu_s["a"] > 0 and alloc.plan_cpu_s["b"] > 0, alloc.plan_cpu_s
            sid_a = a.opened.session_id
            spent_b = alloc.plan_cpu_s["b"]
            with alloc._lock:
                debt = max(0.0, -alloc._bucket("a", time.monotonic())[0])
            charges.clear()
            t0 = time.monotonic()
            for i in range(4):
                assert a.update_profile(wire.UeProfile(GRAPH, 20.0, 5.0, send_mbps=float(i + 1)))
            wait_until(lambda: alloc._ara._ues[sid_a].send_mbps == 4.0, what="the latest update planned", timeout=90)
            elapsed = time.monotonic() - t0
            assert alloc.wait_idle(120)
            assert charges, "a's updates cost no re-plan"
            # each re-plan of a waited until a's debt was repaid at ``share``: the last one started no sooner
            need = (debt + sum(charges[:-1])) / share
            assert elapsed >= 0.9 * need, (elapsed, need, debt, charges)
            assert alloc.plan_cpu_s["b"] == spent_b, alloc.plan_cpu_s
            assert a.broken is None and b.broken is None
        finally:
            for ch, s in ((cha, a), (chb, b)):
                s.close()
                ch.close()


def test_a_queued_update_keeps_its_graph_in_the_tenants_memory_budget() -> None:
    """While an update waits for the planner its parsed graph's reservation stays with its tenant; a newer
    update replaces it (one reservation), and it is released when the planner has taken the graph."""
    alloc = AraShareAllocator(policy="neurosurgeon")
    cfg = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB, memory_bytes=4096 * MiB)
    with ServerThread(config=cfg, allocator=alloc) as srv:
        ch, a = _stream(srv, "a")
        mem = srv.runtime.memory
        try:
            assert alloc.wait_idle(120)
            assert mem.held_by("a") == 0
            gate = threading.Event()
            run_job = alloc._run_job
            alloc._run_job = lambda job: (gate.wait(120), run_job(job))
            try:
                assert a.update_profile(wire.UeProfile(GRAPH, 20.0, 5.0, send_mbps=2.0))
                wait_until(lambda: mem.held_by("a") > 0, what="the queued graph held", timeout=30)
                one = mem.held_by("a")
                assert a.update_profile(wire.UeProfile(GRAPH, 20.0, 5.0, send_mbps=3.0))
                wait_until(lambda: getattr(alloc._profile_queued.get(a.opened.session_id), "send_mbps", 0) == 3.0,
                           what="the second update queued", timeout=30)
                assert mem.held_by("a") == one, "the replaced update's graph is still held"
            finally:
                gate.set()
            assert alloc.wait_idle(120)
            wait_until(lambda: mem.held_by("a") == 0, what="released once planned", timeout=30)
            assert alloc._ara._ues[a.opened.session_id].send_mbps == 3.0
        finally:
            a.close()
            ch.close()
        wait_until(lambda: mem.stats().reserved_bytes == 0, what="nothing held after close", timeout=30)


def test_a_charge_counts_in_the_fair_turn() -> None:
    """``ComputeScheduler.charge``: a tenant charged 50 ms of work done elsewhere waits behind a tenant
    that is owed compute, whichever of the two is charged."""

    def order(charged: str, charge_ms: float = 50.0) -> list[str]:
        sched = ComputeScheduler(1, wake_credit_ms=0.0)
        try:
            sched.set_group("a", "A")
            sched.set_group("b", "B")
            for k in ("a", "b"):  # both have been served once (neither is new)
                sched.submit(k, lambda: None).result(10)
            sched.charge(charged, charge_ms)
            hold = threading.Event()
            blocker = sched.submit("z", hold.wait)  # the worker is busy while both queue
            time.sleep(0.05)
            ran: list[str] = []
            futs = [sched.submit(k, lambda k=k: ran.append(k)) for k in ("a", "b")]
            hold.set()
            blocker.result(10)
            for f in futs:
                f.result(10)
            return ran
        finally:
            sched.close()

    assert order("a") == ["b", "a"]
    assert order("b") == ["a", "b"]
    sched = ComputeScheduler(1)
    try:
        sched.charge("gone", 10.0)  # a session already dropped: nothing kept
        assert "gone" not in sched._vtime
    finally:
        sched.close()
