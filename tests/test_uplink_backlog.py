"""The uplink's backlog at a request's start (``ue_client.backlog``): bytes a previous request (a local
prefetch) handed to the link that it has not carried yet delay a split request's input and upload; stream20
measured the cold request after a prefetch 70-74 ms over its prediction at 10 % UE / 400 Mbit/s for want of it.

Unit: the backlog in link time from the socket's counter (less one bandwidth-delay product) or the pacing
clock, and what it adds to a plan, equal the model on random cases; the socket counter reads a real TCP
socket's unacknowledged bytes. Real server: a prefetch stream's first remote request is planned with the
backlog in its prediction (the report carries it) and every answer equals the user's eager module."""

from __future__ import annotations

import random
import socket
import time

import pytest

from tests.checks import checked_call, prefetch_stream, until_remote
from ue_client import backlog as bl
from ue_client import planning


def _choice(rng: random.Random) -> planning.PlanChoice:
    server = frozenset() if rng.random() < 0.3 else frozenset(f"op{i}" for i in range(rng.randint(1, 5)))
    pred = rng.uniform(1.0, 900.0)
    d = {"ue_finish_ms": rng.uniform(0.0, 200.0)} if rng.random() < 0.8 else {}
    if rng.random() < 0.5:
        d["mean_ms"] = pred
    return planning.PlanChoice(policy="mjoa", server_ops=server, predicted_ms=pred, warm_ms=pred / 2,
                               serial_ms=pred * 1.5, details=d)


def test_backlog_ms_equals_the_model_on_random_cases():
    rng = random.Random(20)
    for _ in range(2000):
        mbps, rtt = rng.uniform(0.5, 2000.0), rng.uniform(0.0, 80.0)
        paced = rng.uniform(-0.05, 0.3)
        sock = None if rng.random() < 0.3 else rng.randint(0, 20 << 20)
        got = bl.backlog_ms(socket_bytes=sock, paced_s=paced, uplink_mbps=mbps, rtt_ms=rtt)
        bytes_per_ms = mbps * 1e6 / 8 / 1e3
        want = max(0.0, paced) * 1e3  # the pacing clock, and the socket's counter where there is one
        if sock is not None:
            want = max(want, (sock - bytes_per_ms * rtt) / bytes_per_ms)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    # 3 MB unacknowledged at 400 Mbit/s with a 20 ms RTT: 1 MB is in propagation, 2 MB (40 ms) queued
    assert bl.backlog_ms(socket_bytes=3_000_000, paced_s=0.0, uplink_mbps=400.0, rtt_ms=20.0) == pytest.approx(40.0)
    # a relay that acknowledges at once (socket 0): the pacing clock still says what the link has to carry
    assert bl.backlog_ms(socket_bytes=0, paced_s=0.07, uplink_mbps=400.0, rtt_ms=20.0) == pytest.approx(70.0)
    for bad in ({"uplink_mbps": 0.0, "rtt_ms": 1.0}, {"uplink_mbps": 1.0, "rtt_ms": -1.0},
                {"uplink_mbps": float("nan"), "rtt_ms": 1.0}):
        with pytest.raises(ValueError):
            bl.backlog_ms(socket_bytes=1, paced_s=0.0, **bad)


def test_the_prediction_with_a_backlog_equals_the_model_on_random_cases():
    rng = random.Random(21)
    for _ in range(2000):
        c = _choice(rng)
        b = rng.choice([0.0, 0.2, rng.uniform(0.0, 300.0)])
        up = rng.random() < 0.5
        out = bl.with_backlog(c, b, up)
        if not c.server_ops or b < bl.MIN_BACKLOG_MS:
            add = 0.0
        elif up:  # the upload starts behind the whole backlog
            add = b
        else:  # the cut tensor is ready when the UE part ends: what is left of the backlog then
            add = max(0.0, b - c.details.get("ue_finish_ms", 0.0))
        assert out.predicted_ms == pytest.approx(c.predicted_ms + add)
        assert out.serial_ms == pytest.approx(c.serial_ms + add)
        assert out.warm_ms == c.warm_ms and out.server_ops == c.server_ops
        if add:
            assert out.details["backlog_ms"] == b and out.details["backlog_added_ms"] == pytest.approx(add)
            assert out.details["mean_ms"] == pytest.approx(c.details.get("mean_ms", c.predicted_ms) + add)
            assert "backlog_ms" not in c.details  # the input choice (a cached decision) is not changed
        else:
            assert out is c


def test_the_socket_counter_reads_unacknowledged_bytes():
    """A real loopback TCP connection whose peer does not read: what the sender wrote beyond the peer's
    window stays in its socket, and the counter says so (0 once the peer read everything)."""
    from ue_client.data_channel import socket_unacked_bytes

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (the accepted socket inherits it)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        a = socket.socket()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        a.connect(srv.getsockname())
        b, _ = srv.accept()
        try:
            assert socket_unacked_bytes(a) == 0
            a.setblocking(False)
            sent = 0
            try:
                while sent < 8 << 20:
                    sent += a.send(b"x" * 65536)
            except BlockingIOError:
                pass
            q = socket_unacked_bytes(a)
            assert q is not None and 0 < q <= sent
            b.settimeout(10)
            got = 0
            while got < sent:
                got += len(b.recv(1 << 20))
            end = time.monotonic() + 5
            while socket_unacked_bytes(a) != 0 and time.monotonic() < end:  # the last acknowledgement
                time.sleep(0.01)
            assert socket_unacked_bytes(a) == 0
        finally:
            a.close()
            b.close()
    finally:
        srv.close()
    assert socket_unacked_bytes(a) is None  # closed


@pytest.mark.parametrize("source", ["socket", "pacing"])
def test_a_prefetch_streams_first_remote_request_counts_the_backlog(server, monkeypatch, source):
    """Real server on a free port, resnet18 at the 10 % / 400 Mbit/s cell's costs (as
    ``test_prefetch_tail``'s stream): the first request prefetches locally; the uplink is read as 50 ms
    behind at every split request's plan (the data channel socket's counter 50 ms of the planning link beyond
    one bandwidth-delay product, the pacing clock 50 ms ahead: what a link still carrying the prefetch's bytes
    shows; the loopback carries them at once), so the first remote request, which uploads, is predicted 50
    ms later than its plan, its report carries the backlog, and every answer is the user's eager module's. Each
    source alone (``source``; the other reads nothing) gives the 50 ms: the client reads both, the larger counts."""
    from ue_client.data_channel import DataSender
    from ue_client.session import UplinkQueue

    engines = []
    # 50 ms of the planning link queued beyond one bandwidth-delay product in the data channel's socket (the
    # loopback acknowledges at once), or 50 ms on the pacing clock without a data channel
    monkeypatch.setattr(UplinkQueue, "paced_backlog_s", lambda self: 0.05 if source == "pacing" else 0.0)

    def unacked(self):
        link = engines[0].probe.planning_link()
        return int(link.uplink_mbps * 125.0 * ((50.0 if source == "socket" else 0.0) + link.rtt_ms))

    monkeypatch.setattr(DataSender, "unacked_bytes", unacked)
    seen: list[tuple[planning.PlanChoice, planning.PlanChoice]] = []
    real = bl.with_backlog

    def spy(choice, backlog, uploads):
        out = real(choice, backlog, uploads)
        seen.append((choice, out))
        return out

    monkeypatch.setattr(bl, "with_backlog", spy)
    with prefetch_stream(server) as c:
        eng = c.engine
        engines.append(eng)
        first = checked_call(c, 0)
        assert first.server_ops == 0 and first.plan_reason.startswith("prefetch"), first.plan_reason
        assert first.uplink_backlog_ms is None
        eng.conn.session.queue.quiet_s = 600.0  # the backlog is read at every split request's plan
        reps = until_remote(c, first)
        cold = reps[-1]
        assert cold.server_ops > 0 and cold.uploaded_weight_bytes > 0, [r.plan_reason for r in reps]
        assert not any(r.fallback for r in reps), reps
        assert cold.uplink_backlog_ms == pytest.approx(50.0)
        assert cold.uplink_backlog_added_ms == pytest.approx(50.0)  # it uploads: the whole backlog
        before, after = seen[-1]
        assert after.predicted_ms == pytest.approx(before.predicted_ms + 50.0)
        assert cold.predicted_ms == pytest.approx(after.predicted_ms)


def test_a_steady_split_run_reads_no_backlog_inside_its_plan(server, monkeypatch):
    """Real server, resnet18 on a 10x-slowed UE (every op on the server), decisions inline: once its weights are
    up, back-to-back split requests (each within the queue's ``quiet_s`` of the previous one's cut tensors) read
    neither backlog source in their plan window (session 20's re-reading: ``last_data_t``, stamped by cut tensors
    too, made every split request read a lock, an ioctl and the planning link, ~0.04 ms of CPU at full speed):
    their tensors were delivered before their answers came. The queue's ``last_weight_t`` stays at the weights'
    hand-over while ``last_data_t`` follows the tensors. Every answer is the user's eager module's."""
    from ue_client import CoinferClient, new_tenant
    from ue_client.data_channel import DataSender
    from ue_client.session import UplinkQueue

    reads = {"paced": 0, "socket": 0}
    paced, unacked = UplinkQueue.paced_backlog_s, DataSender.unacked_bytes

    def count_paced(self):
        reads["paced"] += 1
        return paced(self)

    def count_socket(self):
        reads["socket"] += 1
        return unacked(self)

    with CoinferClient("torchvision:resnet18", server=server.address, tenant=new_tenant(), policy="auto",
                       ue_slowdown=10.0, link=(400.0, 5.0), plan_background=False, transport_memory=False) as c:
        checked_call(c, 0)
        assert c.engine.wait_uploads(60)
        q = c.engine.conn.session.queue
        q.quiet_s = 1.5  # a checked call (the eager comparison included) within it on a loaded machine (CI: 1.1 s
        time.sleep(q.quiet_s + 0.05)  # against 0.3); the weights' hand-over is behind ``quiet_s``
        monkeypatch.setattr(UplinkQueue, "paced_backlog_s", count_paced)
        monkeypatch.setattr(DataSender, "unacked_bytes", count_socket)
        reps = []
        for i in range(1, 6):
            reps.append(checked_call(c, i))
            assert time.perf_counter() - q.last_data_t < q.quiet_s  # the tensors' stamp is recent
        assert all(r.server_ops == len(c.graph.ops) for r in reps), [r.server_ops for r in reps]
        assert q.last_data_t > q.last_weight_t + q.quiet_s
        assert reads == {"paced": 0, "socket": 0}, reads
        assert all(not r.uplink_backlog_ms for r in reps)
