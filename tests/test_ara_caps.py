"""ARA's uplink shares capped at what each UE can send, and shared per tenant.

A UE cannot send faster than its CPU-bound send rate (``partitioner.uecpu.UeCpu.rate_mbps``): a share
above rate / cell rate is a wrong allocation. Constructed cases with a known optimum check that every
rule of ``allocate_epochs`` respects the caps and gives the surplus to the others (Smith's rule down its
order, max-min fair for equal shares, the capped KKT point for water-filling, checked by brute force),
then the cap through a real server (``UeProfile.send_mbps``, also sent on the session after OpenSession)
and per-tenant shares (a tenant's k sessions share one tenant's part) on a real server on port 0.
"""

from __future__ import annotations

import dataclasses
import math
import time

import grpc
import pytest

from edge_server.allocation import (
    AraShareAllocator,
    EqualShareAllocator,
    SessionInfo,
    ara_weights,
    split_by_tenant,
    tenant_split,
)
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner import chain
from partitioner.allocation import (
    UPLINK_FLOOR,
    UPLINK_RULES,
    UeProblem,
    allocate_epochs,
    ara,
    epoch_schedule,
    keep_share,
    uplink_shares,
)
from partitioner.costgraph import Link
from partitioner.planners import plan
from partitioner.state import Shares
from tests.ara_cases import two_phase, upload
from tests.waiting import wait_until
from ue_client import wire
from ue_client.errors import ServerError
from ue_client.session import SessionStream

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB)


@pytest.mark.parametrize(("ua", "ub", "cap_a", "cap_b"), [(1000.0, 3000.0, 0.5, 1.0), (1000.0, 3000.0, 0.3, 0.9),
                                                          (2000.0, 2100.0, 0.6, 0.6), (500.0, 4000.0, 1.0, 0.4)])
def test_smith_with_caps_is_the_optimum_of_two_uploads(ua, ub, cap_a, cap_b):
    """Two uploads on one cell, each capped at what its UE can send: the best first split (brute force)
    gives the first in Smith's order its cap and the rest to the other (up to its cap); allocate_epochs
    finds that objective, and no UE is ever given more than its cap."""
    a, b = upload("a", ua, max_uplink=cap_a), upload("b", ub, max_uplink=cap_b)
    ea = allocate_epochs([a, b])
    grid = [UPLINK_FLOOR + (1 - 2 * UPLINK_FLOOR) * i / 4000 for i in range(4001)]
    best = min(two_phase(a, b, x) for x in grid)
    assert ea.objective_ms == pytest.approx(best, rel=1e-3)
    assert ea.uplink["a"] <= cap_a + 1e-12 and ea.uplink["b"] <= cap_b + 1e-12
    for rule in UPLINK_RULES:
        first, _ = epoch_schedule([a, b], rule)
        assert first["a"] <= cap_a + 1e-12 and first["b"] <= cap_b + 1e-12, (rule, first)
    first = "a" if ua <= ub else "b"
    other = "b" if first == "a" else "a"
    caps = {"a": cap_a, "b": cap_b}
    sm, _ = epoch_schedule([a, b], "smith")
    assert sm[first] == pytest.approx(min(caps[first], 1 - UPLINK_FLOOR))
    assert sm[other] == pytest.approx(min(caps[other], 1 - sm[first]))


def test_caps_that_sum_below_one_leave_the_rest_unused():
    """Three UEs that together can send 0.6 of the cell: every rule gives each its cap (the objective's
    optimum: each upload as fast as its UE can send) and nobody the rest."""
    caps = {"a": 0.2, "b": 0.3, "c": 0.1}
    dem = [upload(u, 1000.0 * (i + 1), max_uplink=c) for i, (u, c) in enumerate(caps.items())]
    for rule in UPLINK_RULES:
        first, finish = epoch_schedule(dem, rule)
        assert first == pytest.approx(caps), rule
        for d in dem:
            assert finish[d.ue_id] == pytest.approx(d.overlap_up_ms / caps[d.ue_id]), rule


def test_equal_shares_with_caps_are_max_min_fair():
    """Processor sharing with caps: a UE that can send 0.1 of the cell keeps 0.1, the two others split
    the rest (0.45 each); with caps 0.2 / 0.5 / 1 the last takes 1 - 0.2 - 0.4 = 0.4."""
    first, _ = epoch_schedule([upload("a", 100.0, max_uplink=0.1), upload("b", 900.0), upload("c", 900.0)], "equal")
    assert first == pytest.approx({"a": 0.1, "b": 0.45, "c": 0.45})
    first, _ = epoch_schedule([upload("a", 900.0, max_uplink=0.2), upload("b", 900.0, max_uplink=0.5),
                               upload("c", 900.0)], "equal")
    assert first == pytest.approx({"a": 0.2, "b": 0.4, "c": 0.4})


@pytest.mark.parametrize(("ua", "ub", "cap_a"), [(4000.0, 1000.0, 0.5), (4000.0, 1000.0, 0.8), (9000.0, 100.0, 0.3)])
def test_waterfilling_with_caps_is_the_constrained_optimum(ua, ub, cap_a):
    """MJOA-MU's water-filling for held shares, min sum w U_n / beta_n s.t. sum beta <= 1, beta_a <=
    cap_a: the KKT point clips beta_a(lambda) at its cap; brute force over beta_a agrees."""
    a, b = upload("a", ua, max_uplink=cap_a), upload("b", ub)
    got = uplink_shares([a, b])

    def cost(x: float) -> float:
        return ua / x + ub / (1 - x)

    grid = [i / 100000 for i in range(1, 100000) if i / 100000 <= cap_a]
    best = min(grid, key=cost)
    assert got["a"] == pytest.approx(best, abs=2e-5) and got["a"] <= cap_a + 1e-12
    assert got["a"] + got["b"] == pytest.approx(1.0)
    unconstrained = math.sqrt(ua) / (math.sqrt(ua) + math.sqrt(ub))
    assert got["a"] == pytest.approx(min(unconstrained, cap_a), rel=1e-6)


def test_ara_caps_a_ue_at_its_send_rate_and_plans_it_there():
    """Two UEs with the same model on a 20 Mbit/s cell; a (weight 1) goes first by Smith's rule. When a can
    send only 5 Mbit/s its share is 0.25 (not ~0.98) and b gets the rest; ARA predicts a's latency at
    0.25 of the cell, and a's keep-share floor is at most its cap."""
    g = chain([(40.0, 2.0, 4_000, 500_000)] * 3, input_bytes=4_000)
    link = Link(20.0, rtt_ms=5.0)
    free = ara([UeProblem("a", g, link, weight=1.0), UeProblem("b", g, link, weight=0.25)], policy="neurosurgeon")
    assert free.shares["a"].uplink > 0.9
    capped = ara([UeProblem("a", g, link, weight=1.0, send_mbps=5.0), UeProblem("b", g, link, weight=0.25)],
                 policy="neurosurgeon")
    assert capped.shares["a"].uplink == pytest.approx(0.25)
    assert capped.shares["b"].uplink == pytest.approx(0.75)
    assert capped.predicted_ms["a"] > free.predicted_ms["a"] * 2  # 1.5 MB at 5 instead of ~20 Mbit/s
    pb = UeProblem("a", g, link, send_mbps=5.0)
    p = plan("neurosurgeon", g, link, share=Shares(1.0, 0.25))
    assert keep_share(pb, p, policy="neurosurgeon", compute=1.0) <= 0.25


def _stream(address: str, tenant: str, **kw) -> tuple[grpc.Channel, SessionStream]:
    ch = wire.channel(address)
    return ch, SessionStream(wire.stub(ch), tenant, "m", **kw)




def test_a_send_rate_sent_on_the_session_caps_the_uplink_share_through_the_server():
    """A real server on port 0, ARA: the light UE goes first (> 0.5 of the cell). It then reports on its
    session that it can send 4 Mbit/s of the 20 Mbit/s cell (SessionRequest.profile with only send_mbps):
    its share drops to 0.2, the heavy UE gets the rest, both are told by ShareChanged, and ARA keeps the
    light UE's cost graph and weight. A negative send rate ends that stream with INVALID_ARGUMENT and
    the server goes on serving the other session."""
    heavy = chain([(40.0, 2.0, 4_000, 2_000_000)] * 3, input_bytes=40_000)
    light = chain([(40.0, 2.0, 4_000, 200_000)] * 3, input_bytes=4_000)
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        ch_h, h = _stream(srv.address, "h", cell_uplink_mbps=20.0,
                          profile=wire.UeProfile(heavy.to_json(), 20.0, 5.0))
        ch_l, lt = _stream(srv.address, "l", cell_uplink_mbps=20.0,
                           profile=wire.UeProfile(light.to_json(), 20.0, 5.0, weight=0.5))
        try:
            assert alloc.wait_idle(60)
            sl = alloc.uplink_shares()[lt.opened.session_id]
            assert sl > 0.5
            assert lt.opened.limits.profile_updates  # this server advertises that it takes them
            assert lt.update_profile(wire.UeProfile("", 0.0, weight=0.0, send_mbps=4.0))
            wait_until(lambda: lt.uplink_share == pytest.approx(0.2), what="the capped share at the light UE")
            assert alloc.wait_idle(60)
            ups = alloc.uplink_shares()
            assert ups[lt.opened.session_id] == pytest.approx(0.2)
            assert ups[h.opened.session_id] == pytest.approx(0.8)
            wait_until(lambda: h.uplink_share == pytest.approx(0.8), what="the surplus at the heavy UE")
            pb = alloc._ara._ues[lt.opened.session_id]
            assert pb.send_mbps == 4.0 and pb.weight == 0.5 and len(pb.graph.ops) == len(light.ops)
            h.update_profile(wire.UeProfile("", 0.0, weight=0.0, send_mbps=-1.0))
            wait_until(lambda: h.broken is not None, what="the bad update to end the stream")
            assert isinstance(h.broken, ServerError) and "send_mbps" in str(h.broken)
            assert h.broken.code == "INVALID_ARGUMENT", (h.broken.code, h.broken)
            assert lt.alive
            # to a server that does not advertise profile updates (an older one ends the session on the
            # unknown message) the client sends none, and its session goes on
            lt.opened = dataclasses.replace(lt.opened, limits=dataclasses.replace(lt.opened.limits,
                                                                                   profile_updates=False))
            assert not lt.update_profile(wire.UeProfile("", 0.0, weight=0.0, send_mbps=-1.0))
            time.sleep(0.3)
            assert lt.alive and lt.broken is None
            ch_x, x = _stream(srv.address, "x")  # still serving
            x.close()
            ch_x.close()
        finally:
            for s, ch in ((h, ch_h), (lt, ch_l)):
                s.close()
                ch.close()


def test_tenant_split_and_ara_weights():
    """Per tenant, then per session: tenant weights 2 and 1 give 2/3 and 1/3; tenant a's two sessions
    split its part; ARA weights: a's two sessions claiming 1 each weigh 0.5 each (the tenant's 1), a lone
    session keeps its claim 0.4."""
    s = {"a1": SessionInfo("a1", "a", tenant_weight=2.0), "a2": SessionInfo("a2", "a", tenant_weight=2.0),
         "b1": SessionInfo("b1", "b")}
    assert tenant_split(s) == pytest.approx({"a1": 1 / 3, "a2": 1 / 3, "b1": 1 / 3})
    s = {"a1": SessionInfo("a1", "a"), "a2": SessionInfo("a2", "a"), "b1": SessionInfo("b1", "b", weight=0.4)}
    assert tenant_split(s) == pytest.approx({"a1": 0.25, "a2": 0.25, "b1": 0.5})
    assert ara_weights(s) == pytest.approx({"a1": 0.5, "a2": 0.5, "b1": 0.4})
    assert tenant_split({}) == {}
    # the compute shares' form (SessionManager.tenant_shares): inside a tenant in proportion to the
    # allocator's shares, equally where they give the tenant nothing
    tenants = {"a1": ("a", 1.0), "a2": ("a", 1.0), "b1": ("b", 2.0), "b2": ("b", 2.0)}
    got = split_by_tenant(tenants, inner={"a1": 0.3, "a2": 0.1, "b1": 0.0, "b2": 0.0})
    assert got == pytest.approx({"a1": 0.25, "a2": 1 / 12, "b1": 1 / 3, "b2": 1 / 3})


def test_uplink_shares_are_per_tenant_on_a_real_server():
    """A real server on port 0: tenant a opens two sessions, tenant b one. Equal: b holds half the cell
    and a's two sessions a quarter each (not a third each). ARA, the same model everywhere: a's two
    sessions weigh 0.5 each in the weighted latency sum, b's 1, so b's upload goes first (Smith's rule:
    U / w smallest) and gets the most of the cell."""
    g = chain([(40.0, 2.0, 4_000, 500_000)] * 3, input_bytes=4_000)
    for alloc in (EqualShareAllocator(), AraShareAllocator(policy="neurosurgeon")):
        with ServerThread(config=CFG, allocator=alloc) as srv:
            streams = []
            try:
                for tenant in ("a", "a", "b"):
                    streams.append(_stream(srv.address, tenant, cell_uplink_mbps=20.0,
                                           profile=wire.UeProfile(g.to_json(), 20.0, 5.0)))
                (_, a1), (_, a2), (_, b) = streams
                if isinstance(alloc, AraShareAllocator):
                    assert alloc.wait_idle(60)
                    ups = alloc.uplink_shares()
                    sa1, sa2, sb = (ups[s.opened.session_id] for s in (a1, a2, b))
                    assert sb > 0.5 > sa1 and sb > 0.5 > sa2, ups
                    ws = {u: p.weight for u, p in alloc._ara._ues.items()}
                    assert ws == {a1.opened.session_id: 0.5, a2.opened.session_id: 0.5, b.opened.session_id: 1.0}
                else:
                    sa1, sa2, sb = 0.25, 0.25, 0.5
                ues, want = (a1, a2, b), [sa1, sa2, sb]
                wait_until(lambda ues=ues, want=want: [s.uplink_share for s in ues] == pytest.approx(want),
                      what="the per-tenant shares at the UEs")
            finally:
                for ch, s in streams:
                    s.close()
                    ch.close()


def test_the_client_reports_its_send_rate_after_the_probe():
    """A CoinferClient measures its send cost in the connect-time probe and tells the server's ARA the
    CPU-bound send rate it implies (UeCpu.rate_mbps), on the session it opened without one (and later
    what its sender-bound uploads measured, tests/test_send_rate.py)."""
    from modelgraph import zoo
    from ue_client.client import CoinferClient

    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        module, example = zoo.vit_small()  # 325 kB of weights: a probe sample counts from 256 KiB
        c = CoinferClient(module, example, server=srv.address, policy="offload", suspend_idle=False,
                          cell_uplink_mbps=50.0)
        try:
            c(*example)
            cpu = c.engine.ue_cpu()
            assert cpu is not None and 0 < cpu.rate_mbps < math.inf
            assert c.engine.send_log[0][1:] == (pytest.approx(cpu.rate_mbps), "probe")
            assert alloc.wait_idle(60)
            last = c.engine.send_log[-1][1]
            wait_until(lambda: [p.send_mbps for p in alloc._ara._ues.values()] == [pytest.approx(last)],
                  what="the send rate at ARA")
        finally:
            c.close()


def test_ara_finds_one_offloader_in_a_crowded_cell():
    """Four identical UEs on an 8 Mbit/s cell: local 1000 ms; offloading uploads 500 kB (500 ms at the
    whole cell, 2000 ms at a quarter). From equal shares every UE's re-plan is local (2.0 s > 1.0 s), but
    the optimum lets one UE offload with the cell (~0.52 s) while the others run locally: ARA's re-plan at
    the whole cell finds it, and the objective drops below all-local's 4000 ms (mjoa: it plans the cold
request, upload included)."""
    g = chain([(500.0, 1.0, 1_000, 250_000), (500.0, 1.0, 1_000, 250_000)], input_bytes=1_000)
    link = Link(8.0, rtt_ms=5.0)
    pbs = [UeProblem(f"u{i}", g, link) for i in range(4)]
    assert not plan("mjoa", g, link, share=Shares(0.25, 0.25)).server_ops
    assert plan("mjoa", g, link, share=Shares(1.0, 1.0)).server_ops
    al = ara(pbs, policy="mjoa")
    offloaders = [u for u, p in al.plans.items() if p.server_ops]
    assert len(offloaders) >= 1
    assert al.objective_ms < 4000.0 - 300.0, al.objective_ms
    first = offloaders[0]
    assert al.shares[first].uplink > 0.5
    assert al.predicted_ms[first] < 1000.0
