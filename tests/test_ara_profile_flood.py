"""A UE flooding its session with profile updates (``SessionRequest.profile``) under ARA.

Each update re-plans every profiled session (seconds for large cost graphs, on the planner thread,
holding the GIL most of the time). A UE that sends updates faster than the server plans them must not
queue one re-plan per update (before: 100 updates of a 1000-op graph queued ~16 s of planning, 1000
updates minutes): updates of one session still waiting to be planned are coalesced, the latest wins.
A real server on port 0, real SessionStream clients.
"""

from __future__ import annotations

import threading
import time

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner import chain
from ue_client import wire
from ue_client.session import SessionStream

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB)


def test_a_flood_of_profile_updates_is_coalesced_and_the_last_one_wins():
    """Tenant a sends 40 profile updates of a 300-op cost graph back to back (send rate 1..40 Mbit/s)
    while the planner is busy; tenant b has a session too. They cost one re-plan of a's profile, ARA ends
    with a's last update (send rate 40), and the server still serves (a new session opens)."""
    g = chain([(40.0, 2.0, 4_000, 200_000)] * 300, input_bytes=4_000)
    gj = g.to_json()
    alloc = AraShareAllocator(policy="neurosurgeon")
    n = 40
    with ServerThread(config=CFG, allocator=alloc) as srv:
        streams = []
        try:
            for tenant in ("a", "b"):
                ch = wire.channel(srv.address)
                streams.append(
                    (
                        ch,
                        SessionStream(
                            wire.stub(ch), tenant, "m", cell_uplink_mbps=20.0, profile=wire.UeProfile(gj, 20.0, 5.0)
                        ),
                    )
                )
            assert alloc.wait_idle(120)
            before = alloc.replans
            a = streams[0][1]
            sid = a.opened.session_id
            # The planner is held at its next job until every update has reached the server, so the
            # count does not depend on how fast this machine plans against how fast it sends (a timing
            # race: 15 re-plans for 40 updates on a quiet machine): coalesced, they are one re-plan.
            gate = threading.Event()
            run_job = alloc._run_job
            alloc._run_job = lambda job: (gate.wait(120), run_job(job))
            try:
                for i in range(n):
                    assert a.update_profile(wire.UeProfile(gj, 20.0, 5.0, send_mbps=float(i + 1)))
                deadline = time.monotonic() + 120
                while getattr(alloc._profile_queued.get(sid), "send_mbps", None) != float(n):
                    assert time.monotonic() < deadline, "the last update never reached the allocator"
                    assert a.alive, a.broken
                    time.sleep(0.02)
            finally:
                gate.set()
            assert alloc.wait_idle(120)
            done = alloc.replans - before
            assert done == 1, f"{done} re-plans for {n} updates"
            assert alloc._ara._ues[sid].send_mbps == float(n)
            ch, x = wire.channel(srv.address), None
            x = SessionStream(wire.stub(ch), "c", "m")
            assert x.alive
            x.close()
            ch.close()
        finally:
            for ch, s in streams:
                s.close()
                ch.close()


def test_sessions_that_left_before_their_plan_cost_no_replan():
    """Tenant b opens a session with a 2000-op cost graph (its ARA join plans for a while); meanwhile
    tenant a opens and closes 10 sessions (a churn storm). Their joins and leaves reach the planner after
    they left: nothing to plan (before: 20 re-plans of every profiled session, ~2 per open/close, a
    backlog of seconds for 1000-op graphs). The planner ends with b alone, and its shares are b's."""
    big = chain([(40.0, 2.0, 4_000, 200_000)] * 2000, input_bytes=4_000).to_json()
    small = chain([(40.0, 2.0, 4_000, 200_000)] * 3, input_bytes=4_000).to_json()
    alloc = AraShareAllocator(policy="neurosurgeon")
    # b's join plans until the storm is over, on any CPU (a fast one planned the 2000 ops before the storm
    # began, and then each churned session's join and leave were planned while it was open)
    storm_over = threading.Event()
    real_join = alloc._ara.join

    def slow_join(*args, **kwargs):
        storm_over.wait(60)
        return real_join(*args, **kwargs)

    alloc._ara.join = slow_join
    with ServerThread(config=CFG, allocator=alloc) as srv:
        ch = wire.channel(srv.address)
        b = SessionStream(wire.stub(ch), "b", "m", cell_uplink_mbps=20.0, profile=wire.UeProfile(big, 20.0, 5.0))
        try:
            for _ in range(10):
                s = SessionStream(
                    wire.stub(ch), "a", "m", cell_uplink_mbps=20.0, profile=wire.UeProfile(small, 20.0, 5.0)
                )
                s.close()
            storm_over.set()
            assert alloc.wait_idle(300)
            assert alloc.replans <= 1 + 10, alloc.replans  # b's join, then at most one per churned session
            assert set(alloc._ara._ues) == {b.opened.session_id}
            assert alloc.uplink_shares() == {b.opened.session_id: 1.0}
        finally:
            b.close()
            ch.close()


def test_a_cost_graph_over_the_op_limit_gets_no_ara_plan():
    """ARA re-plans every profiled session at every join, leave and upload completion, ~0.1 CPU s per
    1000 ops of each session's cost graph (measured: 0.5 s for a 5000-op chain), and an 8 MiB
    OpenSession carries ~40k ops: 8 such sessions made each re-plan ~30 s of GIL-bound planning. A cost
    graph over ``MAX_COST_GRAPH_OPS`` is not planned: that session holds an equal share (like any
    profile that does not parse), a later profile update over the limit is ignored, and the others are
    planned as before. (ARA's own bound, met with the server's ``max_cost_graph_ops`` off: by default the
    server refuses such a graph before parsing it, ``tests/test_profile_intake.py``.)"""
    import dataclasses

    from edge_server.allocation import MAX_COST_GRAPH_OPS

    over = chain([(1.0, 0.5, 400, 400)] * (MAX_COST_GRAPH_OPS + 1), input_bytes=400).to_json()
    ok = chain([(40.0, 2.0, 4_000, 200_000)] * 3, input_bytes=4_000).to_json()
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=dataclasses.replace(CFG, max_cost_graph_ops=0), allocator=alloc) as srv:
        ch = wire.channel(srv.address)
        a = SessionStream(wire.stub(ch), "a", "m", cell_uplink_mbps=20.0, profile=wire.UeProfile(ok, 20.0, 5.0))
        b = SessionStream(wire.stub(ch), "b", "m", cell_uplink_mbps=20.0, profile=wire.UeProfile(over, 20.0, 5.0))
        try:
            assert alloc.wait_idle(120)
            assert set(alloc._ara._ues) == {a.opened.session_id}
            a.update_profile(wire.UeProfile(over, 20.0, 5.0, send_mbps=3.0))
            time.sleep(0.5)
            assert alloc.wait_idle(120)
            assert len(alloc._ara._ues[a.opened.session_id].graph.ops) == 3
            assert a.alive and b.alive
        finally:
            a.close()
            b.close()
            ch.close()


def test_the_cost_graph_is_parsed_once_on_its_way_to_ara(monkeypatch):
    """The servicer's strict decoder parses a UE's cost graph; ARA plans from that document and never
    runs ``json.loads`` on the text again (a 10k-op graph took ~30 ms per parse)."""
    import json

    g = chain([(40.0, 2.0, 4_000, 200_000)] * 50, input_bytes=4_000)
    alloc = AraShareAllocator(policy="neurosurgeon")
    loads = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda s, *a, **k: (loads.append(len(s)), real(s, *a, **k))[1])
    with ServerThread(config=CFG, allocator=alloc) as srv:
        ch = wire.channel(srv.address)
        try:
            s = SessionStream(
                wire.stub(ch), "a", "m", cell_uplink_mbps=20.0, profile=wire.UeProfile(g.to_json(), 20.0, 5.0)
            )
            assert alloc.wait_idle(120)
            sid = s.opened.session_id
            assert sid in alloc._ara._ues, "the session got no ARA plan"
            assert srv.runtime.sessions.profile_of(sid).cost_graph is None  # handed over, not kept
            big = [n for n in loads if n >= len(g.to_json())]
            assert len(big) == 1, f"the cost graph was parsed {len(big)} times"
            s.close()
        finally:
            ch.close()


def test_the_parsed_cost_graph_is_not_kept_per_session():
    """The parsed document of a UE's cost graph is handed to the allocator once and not kept with the
    session: as Python objects it is ~24x its text (an 8 MiB OpenSession of ``{}`` ops held 185 MiB per
    session, 64 sessions ~12 GiB, outside ``--memory-mb``), and ARA keeps only the ``CostGraph`` it
    built (bounded by ``MAX_COST_GRAPH_OPS``). Kept before in ``profile_of`` and the allocator's
    ``SessionInfo`` and by the servicer's Session stream for the session's life, with either allocator,
    over ARA's op bound too (the server's own ``max_cost_graph_ops`` off here: by default it refuses such a
    graph unparsed)."""
    import dataclasses
    import gc

    from edge_server.allocation import MAX_COST_GRAPH_OPS, EqualShareAllocator

    ok = chain([(40.0, 2.0, 4_000, 200_000)] * 3, input_bytes=4_000).to_json()
    over = chain([(1.0, 0.5, 400, 400)] * (MAX_COST_GRAPH_OPS + 1), input_bytes=400).to_json()
    for alloc in (AraShareAllocator(policy="neurosurgeon"), EqualShareAllocator()):
        with ServerThread(config=dataclasses.replace(CFG, max_cost_graph_ops=0), allocator=alloc) as srv:
            ch = wire.channel(srv.address)
            streams = []
            try:
                for tenant, gj in (("a", ok), ("b", over)):
                    streams.append(SessionStream(wire.stub(ch), tenant, "m", cell_uplink_mbps=20.0,
                                                 profile=wire.UeProfile(gj, 20.0, 5.0)))
                streams[0].update_profile(wire.UeProfile(ok, 20.0, 5.0, send_mbps=3.0))
                streams[1].update_profile(wire.UeProfile(over, 20.0, 5.0, send_mbps=3.0))
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and any(
                        getattr(srv.runtime.sessions.profile_of(s.opened.session_id), "send_mbps", 0) != 3.0
                        for s in streams):
                    time.sleep(0.02)
                if isinstance(alloc, AraShareAllocator):
                    assert alloc.wait_idle(120)
                    assert streams[0].opened.session_id in alloc._ara._ues
                for s in streams:
                    sid = s.opened.session_id
                    p = srv.runtime.sessions.profile_of(sid)
                    assert p.send_mbps == 3.0 and p.cost_graph_json
                    assert p.cost_graph is None, "the parsed cost graph is kept with the session"
                    info = alloc._sessions[sid]
                    assert info.extra["profile"].cost_graph is None, "the allocator keeps the parsed cost graph"
                gc.collect()  # nothing else holds one either (the Session stream's frame held its profile)
                # (ops non-empty: another test module's constants, e.g. test_attack12's slice specs without
                # ops, live as long as the test process and matched before)
                docs = [o for o in gc.get_objects()
                        if isinstance(o, dict) and isinstance(o.get("ops"), list) and o["ops"] and "weights" in o]
                assert not docs, f"{len(docs)} parsed cost graphs are alive"
            finally:
                for s in streams:
                    s.close()
                ch.close()
