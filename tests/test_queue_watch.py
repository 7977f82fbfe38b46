"""The queue watch (``ue_client.session.QueueWatch``) pings at its busy period only while weights may be on the link
(``UplinkQueue.weights_busy``), and holds the uplink back only for weights.

Before session 21 it followed ``UplinkQueue.busy``, which a request's cut tensors keep true for ``quiet_s`` (0.3 s):
through a stream of warm requests (each within 0.3 s of the previous) it pinged every 150 ms all along, a health
check's CPU on both sides beside every other request, and a ping whose round trip the request's own tensors (or a
throttled UE's CPU) lengthened past the 40 ms target held the uplink, and so the next request's cut tensors, back.
"""

from __future__ import annotations

import time

import torch

from tests.checks import checked_call
from ue_client.session import BACKGROUND, QueueWatch, UplinkItem, UplinkQueue


def _watch(q: UplinkQueue, rtt_s: float) -> tuple[QueueWatch, list[float]]:
    pings: list[float] = []

    def ping() -> float:
        pings.append(time.perf_counter())
        return rtt_s

    return QueueWatch(ping, q, 0.01, period_s=0.02, idle_period_s=30.0), pings


def test_cut_tensors_alone_are_not_pinged_nor_held():
    q = UplinkQueue()
    q.quiet_s = 30.0
    q.last_data_t = time.perf_counter()  # a request's cut tensors were just handed over: ``busy``
    assert q.busy and not q.weights_busy
    w, pings = _watch(q, rtt_s=0.5)  # a slow round trip: 490 ms over the base
    try:
        time.sleep(0.3)
        assert pings == [] and w.deferred_s == 0.0  # (before: a ping every 20 ms, each holding the uplink)
    finally:
        w.stop()
        q.close()


def test_weights_on_the_link_are_pinged_and_held():
    q = UplinkQueue()
    q.quiet_s = 30.0
    q.last_weight_t = q.last_data_t = time.perf_counter()  # weights were just handed over
    assert q.weights_busy
    w, pings = _watch(q, rtt_s=0.5)
    try:
        time.sleep(0.3)
        assert len(pings) >= 3 and w.deferred_s > 0.4
    finally:
        w.stop()
        q.close()


def test_weights_held_back_by_the_background_cap_are_not_busy():
    q = UplinkQueue()
    q.quiet_s = 0.0
    t = torch.zeros(1000)
    q.put(UplinkItem("weight", "w", "float32", (1000,), memoryview(t.numpy()).cast("B"), (BACKGROUND, 0, 0),
                     owner=t))
    assert q.weights_busy
    q.cap_background(0)
    assert not q.weights_busy and not q.busy
    q.close()


def test_a_warm_stream_is_not_pinged(server):
    """Real server on a free port, resnet18 on a 10x-slowed UE (every op on the server once its weights are up),
    decisions inline: after the upload is acknowledged, a queue watch (50 ms busy period) started right after a warm
    request makes no ping through 8 more back-to-back warm requests (their cut tensors kept the queue ``busy``:
    before, it pinged every 50 ms), and every answer is the user's eager module's."""
    from ue_client import CoinferClient, new_tenant, wire

    with CoinferClient("torchvision:resnet18", server=server.address, tenant=new_tenant(), policy="auto",
                       ue_slowdown=10.0, link=(400.0, 5.0), plan_background=False) as c:
        checked_call(c, 0)
        assert c.engine.wait_uploads(60)
        conn = c.engine.conn
        q = conn.session.queue
        time.sleep(q.quiet_s + 0.05)
        checked_call(c, 1)
        # its cut tensors stamped the queue (``busy`` for ``quiet_s`` after them), no weights: read on the stamps, not
        # on ``busy`` itself after ``checked_call``'s two local runs, which a loaded machine stretched past ``quiet_s``
        assert q.last_data_t > q.last_weight_t + q.quiet_s and not q.weights_busy
        conn.watch.stop()
        calls: list[float] = []
        ch = conn.channel

        def ping() -> float:
            calls.append(time.perf_counter())
            return wire.ping(ch, 10.0)

        conn.watch = QueueWatch(ping, q, conn.watch.base_rtt_s, period_s=0.05, idle_period_s=60.0)
        reps = [checked_call(c, i) for i in range(2, 10)]
        assert all(r.server_ops == len(c.graph.ops) for r in reps), [r.server_ops for r in reps]
        assert not any(r.fallback for r in reps)
        assert calls == [] and conn.watch.deferred_s == 0.0, len(calls)


def test_an_upload_that_starts_after_an_idle_period_is_watched_from_its_start():
    """The watch sleeps its idle period (30 s here, 10 s in the client) while no weights wait; weights queued
    meanwhile wake it: it pings at its busy period from then on and holds them back (before session 22 it slept out
    the idle period first: no ping, no hold within it), and ``stop`` ends the idle wait at once."""
    q = UplinkQueue()
    q.quiet_s = 30.0
    assert not q.weights_busy
    w, pings = _watch(q, rtt_s=0.5)
    try:
        time.sleep(0.2)
        assert pings == []  # idle: no ping before the idle period ends
        t = torch.zeros(1000)
        t0 = time.perf_counter()
        q.put(UplinkItem("weight", "w", "float32", (1000,), memoryview(t.numpy()).cast("B"), (BACKGROUND, 0, 0),
                         owner=t))
        assert q.weights_busy
        deadline = t0 + 10.0
        while len(pings) < 3 and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert len(pings) >= 3 and pings[0] - t0 < 5.0 and w.deferred_s > 0.4, (len(pings), w.deferred_s)
    finally:
        w.stop()
        q.close()


def test_stop_ends_an_idle_wait_at_once():
    q = UplinkQueue()
    w, pings = _watch(q, rtt_s=0.01)
    time.sleep(0.05)
    t0 = time.perf_counter()
    w.stop()
    assert time.perf_counter() - t0 < 1.5 and not w._thread.is_alive() and pings == []
    q.close()


def test_the_data_channel_socket_is_read_instead_of_pinging():
    """Where the data channel carries the weights (``socket_backlog_s`` answers), the busy period reads its socket's
    backlog and pings no more (a ping every 150 ms cost a 10 % UE's upload 19 % more CPU: session 22): a backlog over
    the target holds the weights back, one under it does not; where it answers None (no data channel) it pings."""
    for backlog, held in ((0.5, True), (0.01, False)):
        q = UplinkQueue()
        q.quiet_s = 30.0
        q.last_weight_t = q.last_data_t = time.perf_counter()
        pings: list[float] = []

        def ping(pings: list[float] = pings) -> float:
            pings.append(time.perf_counter())
            return 0.5

        w = QueueWatch(ping, q, 0.01, period_s=0.02, idle_period_s=30.0, socket_backlog_s=lambda b=backlog: b)
        try:
            time.sleep(0.3)
            assert pings == [] and w.socket_reads >= 3, (len(pings), w.socket_reads)
            assert (w.deferred_s > 0.4) is held, w.deferred_s
        finally:
            w.stop()
            q.close()
    q = UplinkQueue()
    q.quiet_s = 30.0
    q.last_weight_t = q.last_data_t = time.perf_counter()
    pings = []

    def ping2() -> float:
        pings.append(time.perf_counter())
        return 0.5

    w = QueueWatch(ping2, q, 0.01, period_s=0.02, idle_period_s=30.0, socket_backlog_s=lambda: None)
    try:
        time.sleep(0.3)
        assert len(pings) >= 3 and w.socket_reads == 0 and w.deferred_s > 0.4
    finally:
        w.stop()
        q.close()


def test_weights_the_lost_data_channel_resends_wake_the_watch():
    """The data channel breaks after its last block went idle (the watch asleep in its idle period): the weights it
    sent without the server's confirmation go back in-stream (``UplinkQueue.stop_side``), and the watch wakes for
    them (before: it slept out the idle period)."""
    q = UplinkQueue()
    q.quiet_s = 30.0
    q.start_side(1 << 20)
    w, pings = _watch(q, rtt_s=0.5)
    try:
        time.sleep(0.2)
        assert pings == [] and not q.weights_busy
        t = torch.zeros(1000)
        it = UplinkItem("weight", "w", "float32", (1000,), memoryview(t.numpy()).cast("B"), (BACKGROUND, 0, 0), owner=t)
        it.offset = it.total  # sent whole on the data channel, never confirmed
        q.stop_side([it])
        assert q.weights_busy
        deadline = time.perf_counter() + 5.0
        while len(pings) < 2 and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert len(pings) >= 2, len(pings)
    finally:
        w.stop()
        q.close()


def test_a_socket_reading_that_raises_falls_back_to_a_ping():
    q = UplinkQueue()
    q.quiet_s = 30.0
    q.last_weight_t = q.last_data_t = time.perf_counter()
    pings: list[float] = []

    def ping() -> float:
        pings.append(time.perf_counter())
        return 0.01

    def broken() -> float:
        raise OSError("closed")

    w = QueueWatch(ping, q, 0.01, period_s=0.02, idle_period_s=30.0, socket_backlog_s=broken)
    try:
        time.sleep(0.3)
        assert len(pings) >= 3 and w._thread.is_alive() and w.socket_reads == 0
    finally:
        w.stop()
        q.close()
