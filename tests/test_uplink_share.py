"""Uplink shares on a shared cell: the server's allocator tells each UE its share (SessionOpened /
ShareChanged.uplink_share), re-allocating on join, leave and upload done, and the UE paces its uplink
to share x the cell rate (ue_client.session.UplinkQueue.set_share_rate)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time

import grpc
import pytest

from edge_server.allocation import AraShareAllocator, EqualShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner import chain
from protos.coinfer.v1 import coinfer_pb2 as pb
from testbed.linkemu import LinkEmulatorThread
from tests.waiting import wait_until
from ue_client import wire
from ue_client.session import (
    FOREGROUND,
    SHARE_LOW_CHUNK_BYTES,
    SHARE_MIN_CHUNK_BYTES,
    SessionStream,
    UplinkItem,
    UplinkQueue,
)

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB)




def _stream(address: str, tenant: str, **kw) -> tuple[grpc.Channel, SessionStream]:
    ch = wire.channel(address)
    return ch, SessionStream(wire.stub(ch), tenant, "m", **kw)


def _close(ch: grpc.Channel, s: SessionStream) -> None:
    s.close()
    ch.close()


def test_queue_share_rate_caps_the_pacing_and_keeps_tensor_priority() -> None:
    """With a share rate the queue hands over at most rate x time (+ one chunk and the bucket depth), in
    chunks of about chunk_s at that rate; a tensor put while weights wait goes out next."""
    q = UplinkQueue(chunk_bytes=1 << 20)
    q.set_share_rate(400_000.0)  # 3.2 Mbit/s
    q.put(UplinkItem("weight", "w", "uint8", (600_000,), memoryview(bytearray(600_000)), (FOREGROUND, 1, 0)))
    it = q.messages()
    t0 = time.perf_counter()
    sent, sizes, order = 0, [], []
    while sent < 600_000:
        m = pb.SessionRequest.FromString(next(it))
        kind = m.WhichOneof("msg")
        n = len(getattr(m, kind).data)
        sizes.append(n)
        order.append(kind)
        sent += n
        if sent >= 200_000 and "tensor" not in order and len(order) < 50:
            q.put(UplinkItem("tensor", "x", "uint8", (5000,), memoryview(bytearray(5000)), (FOREGROUND, -1, 1),
                             request_id=1))
            sent -= 5000  # the tensor's bytes are not the weight's
    dt = time.perf_counter() - t0
    assert order[order.index("tensor") - 1] == "weight" and order.index("tensor") < len(order) - 1
    assert max(sizes) <= max(SHARE_MIN_CHUNK_BYTES, 400_000 * q.chunk_s)  # not the 1 MiB maximum
    # 605 kB at 400 kB/s: at least (605 kB - one chunk - depth) / rate; a broken cap sends in ~0 s
    assert dt >= (605_000 - max(sizes) - 400_000 * q.ahead_s) / 400_000.0 * 0.98
    with pytest.raises(ValueError):
        q.set_share_rate(float("inf"))
    q.set_share_rate(None)
    assert q.share_bps is None
    q.close()


def test_equal_uplink_shares_reach_the_client_on_join_and_leave() -> None:
    with ServerThread(config=CFG, allocator=EqualShareAllocator()) as srv:
        ch_a, a = _stream(srv.address, "a", cell_uplink_mbps=8.0)
        try:
            assert a.uplink_share == 1.0 and a.uplink_share_mbps == pytest.approx(8.0)
            ch_b, b = _stream(srv.address, "b")  # not paced: no cell rate known
            assert b.uplink_share == pytest.approx(0.5) and b.uplink_share_mbps is None
            wait_until(lambda: a.uplink_share == pytest.approx(0.5), what="ShareChanged(uplink 0.5)")
            assert a.uplink_share_mbps == pytest.approx(4.0)
            _close(ch_b, b)
            wait_until(lambda: a.uplink_share == pytest.approx(1.0), what="ShareChanged(uplink 1.0) after leave")
            assert [round(u, 3) for _, _, u in a.share_log] == [1.0, 0.5, 1.0]
        finally:
            _close(ch_a, a)


def test_ara_uplink_shares_reach_the_clients_and_follow_join_leave_upload_done() -> None:
    """Two profiled UEs: ARA gives the UE with less to upload the larger uplink share (the cell is
    re-allocated at each upload completion, so the small upload goes first: Smith's rule), both told by
    ShareChanged, summing to 1; when its upload is done the other UE gets the most of the cell; when one
    leaves, the other gets the whole cell again."""
    heavy = chain([(40.0, 2.0, 4_000, 2_000_000)] * 3, input_bytes=40_000)  # (a, c, d, w): 6 MB of weights
    light = chain([(40.0, 2.0, 4_000, 20_000)] * 3, input_bytes=4_000)

    def prof(g):
        return wire.UeProfile(g.to_json(), 20.0, 5.0)

    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        ch_h, h = _stream(srv.address, "h", cell_uplink_mbps=20.0, profile=prof(heavy))
        ch_l, lt = _stream(srv.address, "l", cell_uplink_mbps=20.0, profile=prof(light))
        try:
            assert alloc.wait_idle(60)
            ups = alloc.uplink_shares()
            assert len(ups) == 2 and sum(ups.values()) == pytest.approx(1.0, abs=2e-3)
            sh, sl = ups[h.opened.session_id], ups[lt.opened.session_id]
            assert sl > sh  # the smaller upload first
            wait_until(lambda: h.uplink_share == pytest.approx(sh) and lt.uplink_share == pytest.approx(sl),
                  what="ARA's uplink shares at both UEs")
            assert h.uplink_share_mbps == pytest.approx(20.0 * sh)
            # upload done (the light UE is warm: only cut tensors left to send) re-allocates: its share
            # falls, the heavy one's rises, and both UEs are told
            alloc.on_upload_done(lt.opened.session_id)
            assert alloc.wait_idle(60)
            ups2 = alloc.uplink_shares()
            sh2, sl2 = ups2[h.opened.session_id], ups2[lt.opened.session_id]
            assert sh2 > sh and sl2 < sl and sh2 > 0.5
            wait_until(lambda: h.uplink_share == pytest.approx(sh2) and lt.uplink_share == pytest.approx(sl2),
                  what="the re-allocation after upload done at both UEs")
            _close(ch_l, lt)
            assert alloc.wait_idle(60)
            wait_until(lambda: h.uplink_share == pytest.approx(1.0), what="the whole cell after the other left")
        finally:
            _close(ch_h, h)


def test_a_claimed_weight_buys_no_larger_share() -> None:
    """The profile's weight is the client's claim: a UE with twice the other's upload claiming weight
    1e12 does not go first (Smith's rule orders by upload / weight: the claim would put it first; the
    weight is capped at the tenant's compute_weight, 1.0 without authentication), and the compute shares
    of the two (same server time) stay equal; before the cap the claimer took 98 % of the cell."""
    g = chain([(20.0, 2.0, 10_000, 100_000)] * 3, input_bytes=10_000)
    g2 = chain([(20.0, 2.0, 10_000, 200_000)] * 3, input_bytes=10_000)
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        ch_a, a = _stream(srv.address, "a", cell_uplink_mbps=20.0, profile=wire.UeProfile(g.to_json(), 20.0, 5.0))
        ch_b, b = _stream(srv.address, "b", cell_uplink_mbps=20.0,
                          profile=wire.UeProfile(g2.to_json(), 20.0, 5.0, weight=1e12))
        try:
            assert alloc.wait_idle(60)
            ups = alloc.uplink_shares()
            assert ups[a.opened.session_id] > 0.5 > ups[b.opened.session_id], ups
            shares = alloc.shares()
            assert shares[a.opened.session_id] == pytest.approx(shares[b.opened.session_id], abs=1e-6), shares
        finally:
            _close(ch_b, b)
            _close(ch_a, a)


def _ara_shares_of_victim(uplink_claim: float) -> tuple[float, float]:
    """(compute share, uplink share) ARA gives UE v (honest: 20 Mbit/s on the 20 Mbit/s cell the server is
    configured with) beside UE x of another tenant with the same model claiming ``uplink_claim``."""
    g = chain([(50.0, 2.0, b, 50_000) for b in (200_000, 100_000, 20_000, 4_000, 4_000)], input_bytes=400_000)
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=dataclasses.replace(CFG, cell_uplink_mbps=20.0), allocator=alloc) as srv:
        ch_v, v = _stream(srv.address, "v", cell_uplink_mbps=20.0, profile=wire.UeProfile(g.to_json(), 20.0, 5.0))
        ch_x, x = _stream(srv.address, "x", profile=wire.UeProfile(g.to_json(), uplink_claim, 5.0))
        try:
            assert alloc.wait_idle(60)
            sid = v.opened.session_id
            return alloc.shares()[sid], alloc.uplink_shares()[sid]
        finally:
            _close(ch_x, x)
            _close(ch_v, v)


def test_a_claimed_uplink_rate_buys_no_more_than_the_cell() -> None:
    """ARA plans each UE with the uplink rate its profile claims: a UE claiming 1e5 Mbit/s planned to
    offload everything and took compute 0.61 / uplink 0.98 from an honest UE of another tenant with the
    same model (0.5 / 0.5 when both said 20). The server clamps a claim to the cell rate it is configured
    with (``--cell-uplink-mbps``), so the lie moves the honest UE's shares no more than an honest UE at
    the highest plausible rate (the cell's) does."""
    honest_max = _ara_shares_of_victim(20.0)
    lie = _ara_shares_of_victim(1e5)
    assert lie[0] >= honest_max[0] - 0.01 and lie[1] >= honest_max[1] - 0.01, (lie, honest_max)


def test_downlink_and_round_trip_claims_count_at_most_the_cells_and_clamps_log_once(caplog) -> None:
    """A faster downlink or a shorter round trip than the cell's also makes offloading look cheaper: with
    ``--cell-downlink-mbps`` / ``--cell-rtt-ms`` a claim counts for at most the cell's downlink and at least
    its round trip (as ``--cell-uplink-mbps`` bounds the uplink), at OpenSession and on every update; each
    clamp is one INFO line per session and field, not one per update (a UE re-sends its profile often)."""
    import logging

    g = chain([(50.0, 2.0, 4_000, 50_000)] * 3, input_bytes=4_000).to_json()
    cfg = dataclasses.replace(CFG, cell_uplink_mbps=20.0, cell_downlink_mbps=40.0, cell_rtt_ms=8.0)
    with ServerThread(config=cfg, allocator=EqualShareAllocator()) as srv, caplog.at_level(logging.INFO):
        ch, s = _stream(srv.address, "liar", profile=wire.UeProfile(g, 1e5, rtt_ms=0.0, downlink_mbps=1e5))
        ch_h, h = _stream(srv.address, "honest", profile=wire.UeProfile(g, 10.0, rtt_ms=30.0, downlink_mbps=30.0))
        ch_0, z = _stream(srv.address, "unset", profile=wire.UeProfile(g, 1e5, rtt_ms=9.0))  # downlink 0: the uplink's
        try:
            sm = srv.runtime.sessions
            sid = s.opened.session_id
            p = sm.profile_of(sid)
            assert (p.uplink_mbps, p.downlink_mbps, p.rtt_ms) == (20.0, 40.0, 8.0)
            ph = sm.profile_of(h.opened.session_id)
            assert (ph.uplink_mbps, ph.downlink_mbps, ph.rtt_ms) == (10.0, 30.0, 30.0)  # honest: as claimed
            pz = sm.profile_of(z.opened.session_id)
            assert (pz.uplink_mbps, pz.downlink_mbps, pz.rtt_ms) == (20.0, 0.0, 9.0)  # 20 (the uplink's) <= 40
            for _ in range(5):  # the same lie in every update
                assert s.update_profile(wire.UeProfile(g, 1e5, rtt_ms=0.5, downlink_mbps=1e6))
            wait_until(
                lambda: sum("new profile" in m for m in _profile_lines(caplog, sid)) == 5,
                what="the updates applied",
            )
            assert sm.profile_of(sid).rtt_ms == 8.0 and sm.profile_of(sid).downlink_mbps == 40.0
            clamps = [m for m in _profile_lines(caplog, sid) if "counts as the cell's" in m]
            assert sorted(m.split(" profile ")[1].split()[0] for m in clamps) == [
                "downlink_mbps",
                "rtt_ms",
                "uplink_mbps",
            ], clamps
            assert not [m for m in _profile_lines(caplog, h.opened.session_id) if "counts as the cell's" in m]
        finally:
            _close(ch_0, z)
            _close(ch_h, h)
            _close(ch, s)


def _profile_lines(caplog, sid: str) -> list[str]:
    msgs = [r.getMessage() for r in caplog.records if r.name == "edge_server.session_manager"]
    return [m for m in msgs if sid[:8] in m]


def _upload_rate(address: str, nbytes: int, cell_mbps: float | None,
                 sent: list | None = None) -> tuple[float, float | None]:
    """Upload ``nbytes`` of weights on a session; goodput (Mbit/s) from the first chunk handed over to
    the server's acknowledgement of the last weight, and the rate the session paced to (``sent``: gets the
    session's ``SentRecord``)."""
    ch, s = _stream(address, "pace", cell_uplink_mbps=cell_mbps)
    try:
        items = []
        for _ in range(4):
            data = os.urandom(nbytes // 4)
            sha = hashlib.sha256(data).hexdigest()
            items.append(UplinkItem("weight", sha, "uint8", (len(data),), memoryview(data), (FOREGROUND, 0, 0)))
        done = threading.Event()
        t0 = time.perf_counter()
        for it in items:
            s.queue.put(it)
        wait_until(lambda: all(it.name in s.held for it in items), timeout=60, what="weights acknowledged")
        dt = time.perf_counter() - t0
        done.set()
        if sent is not None:
            sent.append(s.queue.sent)
        return nbytes * 8e-6 / dt, s.uplink_share_mbps
    finally:
        _close(ch, s)


def test_ue_paced_to_its_share_measures_within_10_percent_on_the_emulated_link() -> None:
    """A cell of 8 Mbit/s (userspace link emulator), two sessions: the paced UE's share is 0.5, so 4
    Mbit/s. 700 kB take ~1.4 s: the measured goodput is within 10 % of 4 Mbit/s; the same upload
    unpaced runs near the cell rate (so the check fails when pacing is broken)."""
    cell = 8.0
    with ServerThread(config=CFG, allocator=EqualShareAllocator()) as srv:
        relay = LinkEmulatorThread("127.0.0.1", srv.port, cell, None, 0.0)
        relay.start()
        ch_o, other = _stream(srv.address, "other")  # holds the other half of the cell
        try:
            addr = f"127.0.0.1:{relay.port}"
            paced, share_mbps = _upload_rate(addr, 700_000, cell)
            assert share_mbps == pytest.approx(cell / 2)
            assert abs(paced - share_mbps) <= 0.10 * share_mbps, (paced, share_mbps)
            unpaced, none = _upload_rate(addr, 700_000, None)
            assert none is None and unpaced > 1.3 * share_mbps, unpaced
        finally:
            _close(ch_o, other)
            relay.stop()


def test_a_low_share_is_paced_in_small_chunks_on_the_emulated_link() -> None:
    """A cell of 2 Mbit/s, eight sessions: the paced UE's share is 1/8, 0.25 Mbit/s (31,250 B/s). 96 kB
    take ~3.1 s: the goodput is within 10 % of the share, in chunks of at most ~100 ms of it
    (``SHARE_CHUNK_MAX_S``; >= ``SHARE_LOW_CHUNK_BYTES``): at least 24 messages where 16 KiB chunks made 6,
    each 0.5 s of the share handed over at once."""
    cell = 2.0
    with ServerThread(config=CFG, allocator=EqualShareAllocator()) as srv:
        relay = LinkEmulatorThread("127.0.0.1", srv.port, cell, None, 0.0)
        relay.start()
        others = [_stream(srv.address, f"idle{i}") for i in range(7)]
        try:
            sent: list = []
            paced, share_mbps = _upload_rate(f"127.0.0.1:{relay.port}", 96_000, cell, sent)
            assert share_mbps == pytest.approx(cell / 8)
            assert abs(paced - share_mbps) <= 0.10 * share_mbps, (paced, share_mbps)
            assert sent[0].weight_messages >= 24, sent[0].weight_messages
        finally:
            for ch, s in others:
                _close(ch, s)
            relay.stop()


def test_a_low_share_chunk_of_weights_is_a_fraction_of_a_second() -> None:
    """At 0.125 Mbit/s (the 1/64 floor of an 8 Mbit/s cell) a share-paced chunk of weights is 2 KiB (131 ms
    of the pace), not 16 KiB (1.05 s), in-stream and on the data channel; a cut tensor's chunk stays 16 KiB
    (a request waits on it); from 1.3 Mbit/s on weights go in 16 KiB chunks too."""
    q = UplinkQueue(chunk_bytes=1 << 20)
    q.set_share_rate(15_625.0)
    q.put(UplinkItem("weight", "w", "uint8", (50_000,), memoryview(bytearray(50_000)), (FOREGROUND, 1, 0)))
    it = q.messages()
    sizes = [len(pb.SessionRequest.FromString(next(it)).weight.data) for _ in range(2)]
    assert sizes == [SHARE_LOW_CHUNK_BYTES] * 2, sizes
    q.put(UplinkItem("tensor", "x", "uint8", (20_000,), memoryview(bytearray(20_000)), (FOREGROUND, -1, 1),
                     request_id=1))
    m = pb.SessionRequest.FromString(next(it))
    assert m.WhichOneof("msg") == "tensor" and len(m.tensor.data) == SHARE_MIN_CHUNK_BYTES
    q.close()
    q = UplinkQueue(chunk_bytes=1 << 20)
    q.set_share_rate(15_625.0)
    q.start_side(1 << 20)
    q.put(UplinkItem("weight", "w", "uint8", (50_000,), memoryview(bytearray(50_000)), (FOREGROUND, 1, 0)))
    assert [end - start for _, start, end in q.next_side_block(1.0)] == [SHARE_LOW_CHUNK_BYTES]
    q.close()
    q = UplinkQueue(chunk_bytes=1 << 20)
    q.set_share_rate(200_000.0)  # 1.6 Mbit/s
    q.put(UplinkItem("weight", "w", "uint8", (50_000,), memoryview(bytearray(50_000)), (FOREGROUND, 1, 0)))
    assert len(pb.SessionRequest.FromString(next(q.messages())).weight.data) == SHARE_MIN_CHUNK_BYTES
    q.close()


def test_client_obeys_its_share_and_plans_with_it(cli) -> None:
    """A CoinferClient told the cell rate plans with the cell as its uplink and its uplink share, and
    paces its session to share x cell; the CLI flag is validated."""
    from modelgraph import zoo
    from ue_client.client import CoinferClient

    with ServerThread(config=CFG, allocator=EqualShareAllocator()) as srv:
        ch_o, other = _stream(srv.address, "other")
        module, example = zoo.chain()
        c = CoinferClient(module, example, server=srv.address, policy="offload", cell_uplink_mbps=12.0,
                          suspend_idle=False)
        try:
            c(*example)
            eng = c.engine
            assert eng.planning_link().uplink_mbps == 12.0
            assert eng.conn.session.uplink_share == pytest.approx(0.5)
            assert eng.conn.session.uplink_share_mbps == pytest.approx(6.0)
            assert eng._shares().uplink == pytest.approx(0.5)
            _close(ch_o, other)
            wait_until(lambda: eng._shares().uplink == pytest.approx(1.0), what="the whole cell after the other left")
            c(*example)
            assert c.last_report.fallback is False
        finally:
            c.close()
        rc, _, err = cli("run", "--server", srv.address, "--model", "modelgraph.zoo:chain", "--cell-uplink-mbps", "0")
        assert rc == 2 and "cell_uplink_mbps" in err


def test_ara_uplink_share_has_a_floor() -> None:
    """A session ARA plans local (nothing to send) still gets UPLINK_FLOOR of the cell, the shares still
    sum to at most 1: a UE pacing to, or a cell enforcing, ARA's bare 1e-3 took minutes for 1 MB."""
    from edge_server.allocation import UPLINK_FLOOR, SessionInfo

    offloads = chain([(40.0, 2.0, 4_000, 200_000)] * 3, input_bytes=4_000)
    local = chain([(1.0, 2.0, 4_000_000, 200_000)] * 3, input_bytes=4_000_000)  # sending never pays
    alloc = AraShareAllocator(policy="neurosurgeon", background=False)
    for sid, g in (("a", offloads), ("b", local)):
        info = SessionInfo(sid, "t")
        info.extra["profile"] = wire.UeProfile(g.to_json(), 20.0, 5.0)
        alloc.on_join(info)
    ups = alloc.uplink_shares()
    assert ups["b"] == pytest.approx(UPLINK_FLOOR, rel=0.05) and ups["a"] > 0.9
    assert sum(ups.values()) <= 1 + 1e-9


def test_a_suspended_client_plans_offline_with_the_uplink_share_it_held() -> None:
    """Four sessions on a cell of 8 Mbit/s (equal shares: a quarter each). The client's plans stay local, so
    it suspends its session after a request and plans the next one offline: with the uplink share its
    session held (0.25), not the whole cell. (Planning offline at the whole cell, a dads UE of a crowded
    cell flipped to a cold offload, re-opened its session at a share counted without the suspended
    others, and its upload then ran at a fraction of what it planned with: bench_share N = 8.)"""
    from modelgraph import zoo
    from ue_client.client import CoinferClient

    with ServerThread(config=CFG, allocator=EqualShareAllocator()) as srv:
        others = [_stream(srv.address, f"o{i}") for i in range(3)]
        module, example = zoo.chain()  # a tiny model: every plan is local
        c = CoinferClient(module, example, server=srv.address, policy="dads", cell_uplink_mbps=8.0)
        try:
            eng = c.engine
            seen: list = []
            decide = eng.decisions.decide

            def spy(state, share, **kw):
                seen.append(share)
                return decide(state, share, **kw)

            reuse = eng.decisions.reuse

            def spy_reuse(state, share, **kw):  # (a reuse offline goes here since session 20, not to ``decide``)
                seen.append(share)
                return reuse(state, share, **kw)

            eng.decisions.decide = spy
            eng.decisions.reuse = spy_reuse
            eng.connect()
            wait_until(lambda: eng._shares().uplink == pytest.approx(0.25), what="a quarter of the cell")
            c(*example)
            assert not c.last_report.server_ops and eng.conn.suspended is not None
            assert eng.conn.suspended.uplink == pytest.approx(0.25)
            seen.clear()
            c(*example)
            assert c.last_report.offline and seen and seen[-1].uplink == pytest.approx(0.25), seen
            assert eng.conn.suspensions == 1 and eng.conn.session is None  # stayed offline
        finally:
            c.close()
            for ch, s in others:
                _close(ch, s)


def test_cut_tensors_are_paced_at_the_request_share() -> None:
    """With a share of 1/64 of an 8 Mbit/s cell (15.6 kB/s) and a request share of 1/2 (500 kB/s), a
    12 kB cut tensor is paced at 500 kB/s (24 ms, not the 0.77 s it took at the share); weights keep the
    share; without a request share (an older server) tensors keep the share too. (The pace: the queue's
    virtual link time advances by the bytes handed over / the rate.)"""
    cell = 1_000_000.0
    for req, tensor_rate in ((cell / 2, cell / 2), (None, cell / 64)):
        q = UplinkQueue(chunk_bytes=1 << 20)
        q.set_share_rate(cell / 64, tensor_bps=req)
        it = q.messages()
        for kind in ("tensor", "weight"):
            rate = tensor_rate if kind == "tensor" else cell / 64
            q.put(UplinkItem(kind, "x" if kind == "tensor" else "w", "uint8", (12_000,),
                             memoryview(bytearray(12_000)), (FOREGROUND, -1 if kind == "tensor" else 1, 1),
                             request_id=1 if kind == "tensor" else 0))
            t0 = time.perf_counter()
            m = pb.SessionRequest.FromString(next(it))
            t1 = time.perf_counter()
            assert m.WhichOneof("msg") == kind
            n = len(getattr(m, kind).data)
            # handed over between t0 and t1 on an idle link: the pace ends n / rate after that
            assert n / (q._pace_t - t0) <= rate * 1.001 and n / (q._pace_t - t1) >= rate * 0.999, (kind, req, n)
            q.drop(lambda _: True)
            q._pace_t = 0.0  # the next one starts on an idle link
        q.close()


def test_a_session_at_the_uplink_floor_gets_its_equal_share_for_cut_tensors() -> None:
    """ARA gives a UE that sends nothing (its plan is local, or its upload is done) the 1/64 floor; its
    request share (SessionOpened / ShareChanged.request_uplink_share) is its equal share of the cell (here
    1/2: two tenants), the offloading UE's is its own larger uplink share, and the client paces its cut
    tensors to it (weights stay at the floor)."""
    from edge_server.allocation import UPLINK_FLOOR

    offloads = chain([(40.0, 2.0, 4_000, 200_000)] * 3, input_bytes=4_000)
    local = chain([(1.0, 2.0, 4_000_000, 200_000)] * 3, input_bytes=4_000_000)  # sending never pays
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        ch_a, a = _stream(srv.address, "a", cell_uplink_mbps=8.0, profile=wire.UeProfile(offloads.to_json(), 20.0, 5.0))
        ch_b, b = _stream(srv.address, "b", cell_uplink_mbps=8.0, profile=wire.UeProfile(local.to_json(), 20.0, 5.0))
        try:
            assert alloc.wait_idle(60)
            ups = alloc.uplink_shares()
            sa, sb = ups[a.opened.session_id], ups[b.opened.session_id]
            assert sb == pytest.approx(UPLINK_FLOOR, rel=0.05) and sa > 0.9
            wait_until(lambda: b.uplink_share == pytest.approx(sb) and a.uplink_share == pytest.approx(sa),
                       what="ARA's shares at both UEs")
            wait_until(lambda: b.request_uplink_share == pytest.approx(0.5), what="b's request share")
            assert a.request_uplink_share == pytest.approx(sa)
            assert b.queue.share_bps == pytest.approx(sb * 1e6)
            assert b.queue.tensor_share_bps == pytest.approx(0.5 * 1e6)
            assert a.queue.tensor_share_bps is None  # its share is already more
        finally:
            _close(ch_a, a)
            _close(ch_b, b)
