"""ARA's uplink with re-allocation at every upload completion (``partitioner.allocation.allocate_epochs``):
constructed cases whose optimum is known (Smith's rule for the weighted sum of completion times on one
work-conserving link, checked against a brute-force scan of the first epoch's split), the kink, the
floors that keep a UE's plan, and the per-UE weights reaching ARA through a real server."""

from __future__ import annotations

import pytest

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner import chain
from partitioner.allocation import (
    UPLINK_FLOOR,
    UeDemand,
    UeProblem,
    allocate_epochs,
    ara,
    epoch_schedule,
    keep_share,
)
from partitioner.costgraph import Link
from partitioner.errors import PartitionerError
from partitioner.planners import plan
from partitioner.state import Shares
from tests.ara_cases import two_phase, upload
from ue_client import wire
from ue_client.session import SessionStream

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB)


@pytest.mark.parametrize(("ua", "ub", "wa", "wb"), [(1254.0, 2340.0, 1.0, 1.0), (1000.0, 1000.0, 1.0, 1.0),
                                                    (1000.0, 3000.0, 0.25, 1.0), (500.0, 4000.0, 1.0, 0.5)])
def test_smith_rule_is_the_optimum_of_two_uploads(ua, ub, wa, wb):
    """Two uploads on one cell re-allocated when one finishes: the best first split (brute force over
    [floor, 1 - floor]) puts the upload with the smaller U/w first at 1 - floor, and allocate_epochs
    picks that split with that objective; the water-filling split (bigger upload, bigger share) is worse
    whenever the sizes differ."""
    a, b = upload("a", ua, wa), upload("b", ub, wb)
    ea = allocate_epochs([a, b])
    grid = [UPLINK_FLOOR + (1 - 2 * UPLINK_FLOOR) * i / 4000 for i in range(4001)]
    best = min(grid, key=lambda x: two_phase(a, b, x))
    assert ea.rule == "smith"
    assert ea.objective_ms == pytest.approx(two_phase(a, b, best), rel=1e-6)
    first = "a" if ua / wa <= ub / wb else "b"
    assert ea.uplink[first] == pytest.approx(1 - UPLINK_FLOOR)
    assert ea.objective_ms <= min(ea.objectives.values()) + 1e-9
    if ua != ub:
        assert ea.objectives["waterfill"] > ea.objective_ms * 1.05


def test_measured_case_equal_beats_static_waterfilling_under_reallocation():
    """The testbed's N=2 case (2.34 MB and 1.25 MB on 8 Mbit/s, both all-offloaded): with re-allocation,
    water-filling's 0.58/0.42 ends the small upload later than equal shares and the big one no earlier
    (measured 3.74/3.04 s vs equal 3.74/2.65 s); Smith's rule ends the small one at ~1.3 s."""
    wide, narrow = UeDemand("wide", 1, 0, 2340, 12, 40, 20), UeDemand("narrow", 1, 0, 1254, 12, 30, 20)
    _, fin_w = epoch_schedule([wide, narrow], "waterfill")
    _, fin_e = epoch_schedule([wide, narrow], "equal")
    _, fin_s = epoch_schedule([wide, narrow], "smith")
    assert fin_w["narrow"] > fin_e["narrow"] * 1.1 and fin_w["wide"] >= fin_e["wide"] - 1e-6
    t1 = 1266 / (1 - UPLINK_FLOOR)  # the narrow one's weights and input at 63/64 of the cell
    assert fin_s["narrow"] == pytest.approx(t1)
    assert fin_s["wide"] == pytest.approx(t1 + (2352 - UPLINK_FLOOR * t1) / (1 - UPLINK_FLOOR))
    assert allocate_epochs([wide, narrow]).rule == "smith"


def test_a_hidden_upload_takes_only_its_kink_rate():
    """A UE whose upload can hide behind its local compute (U = 100 ms at the full cell, F = 1000 ms) needs
    only U/F = 0.1 of the cell; Smith's rule gives it that and the rest to the other upload, whose end
    is then 900/0.9 = 1000 ms (it would be 1100 ms if the first took the whole cell)."""
    hidden = UeDemand("h", 1.0, 1000.0, 100.0, 0.0, 0.0, 0.0)
    other = upload("o", 900.0)
    first, finish = epoch_schedule([hidden, other], "smith")
    assert first["h"] == pytest.approx(0.1) and first["o"] == pytest.approx(0.9)
    assert finish["o"] == pytest.approx(1000.0) and finish["h"] == pytest.approx(1000.0)


def test_min_uplink_is_every_offloading_ues_floor():
    """A UE second in Smith's order keeps its min_uplink (its plan's floor), and a UE that offloads
    nothing gets nothing."""
    a, b = upload("a", 100.0), upload("b", 5000.0, min_uplink=0.2)
    c = UeDemand("c", 1.0, 50.0, 0.0, 0.0, 0.0, 0.0, offloads=False)
    ea = allocate_epochs([a, b, c], rules=("smith",))
    assert ea.uplink["b"] == pytest.approx(0.2) and ea.uplink["a"] == pytest.approx(0.8)
    assert ea.uplink["c"] == 0.0
    with pytest.raises(PartitionerError, match="unknown uplink rule"):
        allocate_epochs([a], rules=("bogus",))


def test_keep_share_is_the_share_where_the_plan_flips():
    """A chain whose only sensible split sends the 100 kB input (local 400 ms vs server 10 ms + RTT 10 ms +
    100 kB at s x 10 Mbit/s; the cut after the first op sends 200 kB): dads offloads iff about
    80/s ms + 21 ms < 400 ms, i.e. s > 0.21; the floor ARA gives the UE is that share (within the
    bisection's step and margin): the plan at it is kept, 1.25x below it is not."""
    g = chain([(200.0, 5.0, 200_000, 10_000), (200.0, 5.0, 1_000, 10_000)], input_bytes=100_000)
    link = Link(10.0, rtt_ms=10.0)
    pb = UeProblem("u", g, link)
    full = plan("dads", g, link, share=Shares(1.0, 1.0))
    assert full.server_ops
    lo_share = 0.05
    assert not plan("dads", g, link, share=Shares(1.0, lo_share)).server_ops
    k = keep_share(pb, full, policy="dads", compute=1.0)
    assert 0.15 < k < 0.35
    assert plan("dads", g, link, share=Shares(1.0, k)).server_ops == full.server_ops
    assert plan("dads", g, link, share=Shares(1.0, k / 1.25)).server_ops != full.server_ops


def test_ara_weights_order_the_uplink():
    """Two UEs with the same model: the one with weight 1 goes first (U/w smaller), the one with weight
    0.25 second; swap the weights and the order swaps."""
    g = chain([(40.0, 2.0, 4_000, 500_000)] * 3, input_bytes=4_000)
    link = Link(20.0, rtt_ms=5.0)
    for wa, wb in ((1.0, 0.25), (0.25, 1.0)):
        al = ara([UeProblem("a", g, link, weight=wa), UeProblem("b", g, link, weight=wb)], policy="neurosurgeon")
        hi, lo = ("a", "b") if wa > wb else ("b", "a")
        assert al.uplink_rule == "smith"
        assert al.shares[hi].uplink > 0.5 > al.shares[lo].uplink
        assert al.predicted_ms[hi] < al.predicted_ms[lo]


def test_profile_weights_reach_ara_through_the_server():
    """A UE's weight in its profile (ClientOptions.weight -> UeProfile.weight) reaches the server's ARA:
    of two UEs with the same model the one claiming 1.0 gets the larger uplink share over the one claiming
    0.25 (both under the unauthenticated cap of 1.0), and the allocator records the weights."""
    g = chain([(40.0, 2.0, 4_000, 500_000)] * 3, input_bytes=4_000)
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        chans, sess = [], {}
        try:
            for name, w in (("light", 0.25), ("heavy", 1.0)):
                ch = wire.channel(srv.address)
                chans.append(ch)
                sess[name] = SessionStream(wire.stub(ch), name, "m", cell_uplink_mbps=20.0,
                                           profile=wire.UeProfile(g.to_json(), 20.0, 5.0, weight=w))
            assert alloc.wait_idle(60)
            ups = alloc.uplink_shares()
            hi, lo = sess["heavy"].opened.session_id, sess["light"].opened.session_id
            assert ups[hi] > 0.5 > ups[lo], ups
            assert {u: p.weight for u, p in alloc._ara._ues.items()} == {hi: 1.0, lo: 0.25}
        finally:
            for s in sess.values():
                s.close()
            for ch in chans:
                ch.close()


def test_client_options_weight_goes_in_the_profile():
    """ClientOptions.weight is validated and sent as the profile's weight."""
    from modelgraph import zoo
    from ue_client.client import CoinferClient
    from ue_client.errors import InputError
    from ue_client.options import ClientOptions

    with pytest.raises(InputError, match="weight"):
        ClientOptions(weight=0.0)
    with pytest.raises(InputError, match="weight"):
        ClientOptions(weight=float("inf"))
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        module, example = zoo.chain()
        c = CoinferClient(module, example, server=srv.address, policy="offload", weight=0.4, suspend_idle=False)
        try:
            c(*example)
            assert alloc.wait_idle(60)
            assert [p.weight for p in alloc._ara._ues.values()] == [0.4]
        finally:
            c.close()
