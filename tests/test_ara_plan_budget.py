"""What a session's profile updates may cost ARA's planner thread (session 10 left: three sessions re-sending
10k-op graphs kept the planner busy back to back, holding the GIL beside every session's work, uncharged;
a victim's ~1 ms request took 789 ms median; the graph waiting in ARA's queue was outside ``--memory-mb``).

- Each identity (``SessionInfo.planner_key``: the token's tenant, or the connection without
  --auth-tokens) has a planner CPU bucket (``edge_server.allocation.PLAN_CPU_SHARE`` /
  ``PLAN_CPU_BURST_S``), and all together one global bucket: a re-plan is charged the planner thread's CPU
  time; an identity in debt has its next update planned only once the bucket is back (coalesced meanwhile:
  the latest wins), another identity's update is not held up.
- The re-plan's CPU is counted in the session's fair turn on the compute scheduler
  (``ComputeScheduler.charge``): its next compute waits behind a tenant that is owed compute.
- A queued update's parsed graph keeps its reservation in the tenant's memory budget until the planner
  takes it (or a newer update replaces it, or the session ends).

A real server on port 0, real SessionStream clients.
"""

from __future__ import annotations

import threading
import time

import grpc

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


def _connection(srv) -> grpc.Channel:
    """A channel with its own TCP connection (gRPC shares one among a process's channels of equal
    arguments: one peer, one planner identity without --auth-tokens)."""
    return grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1),
                                                       ("grpc.max_send_message_length", 64 << 20)])


def _stream(srv, tenant: str) -> tuple:
    ch = _connection(srv)
    return ch, SessionStream(wire.stub(ch), tenant, "m", cell_uplink_mbps=20.0,
                             profile=wire.UeProfile(GRAPH, 20.0, 5.0))


def test_a_tenant_in_planner_debt_waits_and_is_charged_alone() -> None:
    """No burst, a refill of 0.1 CPU s per s: after its join tenant a is in debt, so the re-plan of each of
    its updates waits until a's bucket is back at 0 (updates arriving meanwhile coalesce): a's re-plans
    take at most 0.1 of the planner thread over the phase, and the latest update is planned in the end.
    Every re-plan is charged to the tenant that caused it: b's account does not move with a's updates."""
    share = 0.1
    alloc = AraShareAllocator(policy="neurosurgeon", plan_cpu_share=share, plan_cpu_burst_s=0.0)
    charged: list[tuple[str, float]] = []
    charge = alloc._charge

    def record(sid, cpu_s, work_s=None):  # what the causer's own bucket was charged (not others' subproblems)
        key = alloc._tenant_of.get(sid)
        before = alloc.plan_cpu_s.get(key, 0.0)
        charge(sid, cpu_s, work_s)
        charged.append((sid, alloc.plan_cpu_s.get(key, 0.0) - before))

    alloc._charge = record
    with ServerThread(config=CFG, allocator=alloc) as srv:
        (cha, a), (chb, b) = _stream(srv, "a"), _stream(srv, "b")
        try:
            assert alloc.wait_idle(120)
            sid_a = a.opened.session_id
            ka, kb = alloc._tenant_of[sid_a], alloc._tenant_of[b.opened.session_id]
            assert ka != kb and ka.startswith("peer:"), (ka, kb)  # no --auth-tokens: one identity per connection
            assert alloc.plan_cpu_s[ka] > 0 and alloc.plan_cpu_s[kb] > 0, alloc.plan_cpu_s
            spent_b = alloc.plan_cpu_s[kb]
            debt = max(0.0, -alloc.budgets.tokens(ka))
            charged.clear()
            t0 = time.monotonic()
            for i in range(4):
                assert a.update_profile(wire.UeProfile(GRAPH, 20.0, 5.0, send_mbps=float(i + 1)))
            wait_until(lambda: alloc._ara._ues[sid_a].send_mbps == 4.0, what="the latest update planned", timeout=90)
            elapsed = time.monotonic() - t0
            assert alloc.wait_idle(120)
            charges = [c for sid, c in charged if sid == sid_a]
            assert charges, "a's updates cost no re-plan"
            # each re-plan of a waited until a's debt was repaid at ``share``: the last one started no sooner
            need = (debt + sum(charges[:-1])) / share
            assert elapsed >= 0.9 * need, (elapsed, need, debt, charges)
            assert alloc.plan_cpu_s[kb] == spent_b, alloc.plan_cpu_s
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


def test_a_graph_over_the_bound_is_planned_contracted_or_whole_before_its_plan_starts() -> None:
    """ARA's cost grows with the ops and weights it holds (a 10k-op chain's join: 48 CPU s of one plan on the
    planner thread, the GIL beside every session's work). Through the protos, size bounds 1024 per session
    and 2048 in all: beside an honest 300-op graph (size 600: planned as sent), a 1000-op chain (size
    1998; contracted: 1 op, 999 weights), a 10k-op chain (too many ops to contract, and little left of the
    total: planned whole, 1 op) and a 900-op graph of branches that no contraction brings under the bound
    (whole), each from its own connection. ARA never holds more than the bounds; the honest session keeps
    its graph."""
    from partitioner.synthetic import random_dag

    alloc = AraShareAllocator(policy="neurosurgeon", plan_size=1024, total_plan_size=2048)
    graphs = (chain([(40.0, 2.0, 4_000, 200_000)] * 999, input_bytes=4_000).to_json(),
              chain([(40.0, 2.0, 4_000, 200_000)] * 9_999, input_bytes=4_000).to_json(),
              random_dag(3, 900, "branches").to_json())
    with ServerThread(config=CFG, allocator=alloc) as srv:
        (chv, v) = _stream(srv, "victim")
        opened = []
        try:
            assert alloc.wait_idle(120)
            for i, g in enumerate(graphs):
                ch = _connection(srv)
                opened.append((ch, SessionStream(wire.stub(ch), f"big{i}", "m", profile=wire.UeProfile(g, 20.0, 5.0))))
            assert alloc.wait_idle(120)
            held = {sid: len(pb.graph) for sid, pb in alloc._ara._ues.items()}
            assert held[v.opened.session_id] == 300, held  # as sent
            assert [held[s.opened.session_id] for _, s in opened] == [1, 1, 1], held
            assert alloc._ara.held_size() <= 2048
            assert alloc.bounded == {"contracted": 1, "whole": 2}, alloc.bounded
            assert v.broken is None
        finally:
            for ch, s in [(chv, v), *opened]:
                s.close()
                ch.close()


def test_with_tokens_the_planner_identity_is_the_tokens_tenant_on_every_connection(tmp_path) -> None:
    """With --auth-tokens a tenant's sessions on two connections share one planner bucket (``tenant:NAME``),
    another tenant has its own; without tokens (above) each connection is its own identity."""
    import json

    tokens = {t: f"{t}-token-0123456" for t in ("alice", "bob")}
    p = tmp_path / "tokens.json"
    p.write_text(json.dumps({"tenants": {t: {"token": tok} for t, tok in tokens.items()}}))
    cfg = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB, auth_tokens_file=str(p))
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=cfg, allocator=alloc) as srv:
        opened = []
        try:
            for tenant in ("alice", "alice", "bob"):
                ch = grpc.intercept_channel(_connection(srv), wire._BearerToken(tokens[tenant]))
                opened.append((ch, SessionStream(wire.stub(ch), tenant, "m", profile=wire.UeProfile(GRAPH, 20.0, 5.0))))
            assert alloc.wait_idle(120)
            keys = [alloc._tenant_of[s.opened.session_id] for _, s in opened]
            assert keys == ["tenant:alice", "tenant:alice", "tenant:bob"], keys
        finally:
            for ch, s in opened:
                s.close()
                ch.close()


def test_the_global_planner_bucket_defers_every_identity_once_in_debt() -> None:
    """Identities minted for free (new connections) each have a full bucket, so a global one bounds them all:
    once a join put it in debt, another identity's join waits (deferred, not planned yet), while its own
    bucket is untouched."""
    from edge_server.allocation import GLOBAL_KEY, SessionInfo
    from protos.values import UeProfile

    alloc = AraShareAllocator(policy="neurosurgeon", plan_cpu_global_share=1e-3, plan_cpu_global_burst_s=0.0)

    def info(sid: str, key: str) -> SessionInfo:
        i = SessionInfo(sid, "t", "m", planner_key=key)
        i.extra["profile"] = UeProfile(cost_graph_json=GRAPH, uplink_mbps=20.0, rtt_ms=5.0)
        return i

    alloc.on_join(info("s1", "peer:one"))
    assert alloc.wait_idle(120) and "s1" in alloc._ara
    assert alloc.budgets.tokens(GLOBAL_KEY) < 0
    alloc.on_join(info("s2", "peer:two"))
    assert alloc.deferred == 1 and "s2" not in alloc._ara
    assert alloc.budgets.tokens("peer:two") == alloc.budgets.burst
