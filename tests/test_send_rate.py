"""The send rate a UE reports to the server's allocator (``UeProfile.send_mbps``, ARA's cap on its uplink
share) is one it sustains: its probe's CPU-bound rate until an upload measured it, then the goodput of
its latest sender-bound upload (it handed its bytes over slower than its pace), sent again on the
session (``SessionRequest.profile``) when it moved by more than ``SEND_UPDATE_MARGIN``.

Real server on port 0 with ARA and its data channel, a real client; a UE too slow to keep its pace is
emulated by a data-channel sender that takes the time a CPU-bound sender would (its writes sleep
bytes / rate: shaping the link instead does not make the UE's handover lag reliably, the socket buffers
between it and a userspace relay absorbed 1-3 MB).
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner.uecpu import UeCpu
from tests.waiting import wait_until
from ue_client import data_channel
from ue_client.client import CoinferClient
from ue_client.send_rate import SEND_UPDATE_MARGIN
from ue_client.uploads import SENDER_BOUND, _sample

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB, data_port=0)
CELL = 32.0


def test_a_sample_is_sender_bound_only_when_the_handover_lags_its_pace():
    """1 MB handed over in 2 s (4 Mbit/s) at a pace of 8: sender-bound, its goodput the bytes over the time
    to the acknowledgement; handed over in 1.05 s (kept up) but acknowledged late: not (the round trip and
    the server's commit are not the UE's send rate); just above ``SENDER_BOUND`` x the pace: not; unpaced
    (no pace to lag) or without a handover time: never."""
    s = _sample(10.0, 1_000_000, 12.1, 1e6, (12.0, 1e6))
    assert s["handover_mbps"] == pytest.approx(4.0) and s["pace_mbps"] == pytest.approx(8.0)
    assert s["sender_bound"] and s["mbps"] == pytest.approx(8 / 2.1) and s["share_mbps"] == pytest.approx(8.0)
    late = _sample(10.0, 1_000_000, 12.0, 1e6, (11.05, 1e6))
    assert not late["sender_bound"] and late["mbps"] == pytest.approx(4.0)
    edge = 8.0 * SENDER_BOUND * 1.01  # a handover just above the bound
    assert not _sample(10.0, 1_000_000, 12.0, 1e6, (10.0 + 8 / edge, 1e6))["sender_bound"]
    assert _sample(10.0, 1_000_000, 12.0, 1e6, (10.0 + 8 / (edge / 1.02), 1e6))["sender_bound"]
    assert not _sample(10.0, 1_000_000, 12.1, None, (12.0, None))["sender_bound"]
    assert not _sample(10.0, 1_000_000, 12.1, None, None)["sender_bound"]


def _model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Four 3x3 convs of 96 channels (~1 MB of weights): ~1 s of upload at 8 Mbit/s."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 96, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(96, 96, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10)]
    return nn.Sequential(*layers).eval(), (torch.randn(1, 3, 16, 16),)


@pytest.mark.parametrize("sender_mbps", [8.0, None])
def test_the_ue_reports_the_send_rate_it_sustained_and_ara_caps_its_share_there(sender_mbps, monkeypatch):
    """ARA (every UE offloading) on a 32 Mbit/s cell; the UE's probe says it sends 20 Mbit/s, so ARA's share
    for it is that cap, 20 / 32, and the UE paces to 20 Mbit/s.

    A sender that manages only 8 Mbit/s cannot keep that pace: its upload is sender-bound, and after the
    request the UE reports the goodput it measured (~8 Mbit/s) on the session; ARA's share becomes that
    rate / 32 (the new cap), the UE is told so and paces there. A warm request after it uploads nothing
    and sends no update. A sender that keeps its pace: no sender-bound sample, no update.
    """
    if sender_mbps is not None:
        send = data_channel._sendmsg_all

        def slow(sock, bufs):
            send(sock, bufs)
            time.sleep(sum(memoryview(b).nbytes for b in bufs) * 8e-6 / sender_mbps)

        monkeypatch.setattr(data_channel, "_sendmsg_all", slow)
    module, example = _model()
    alloc = AraShareAllocator(policy="offload")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        probe_rate = 20.0
        c = CoinferClient(module, example, server=srv.address, policy="offload", cell_uplink_mbps=CELL,
                          probe=False, send_cpu=UeCpu(1.0 / (probe_rate * 125.0)), suspend_idle=False,
                          profile_runs=2)
        try:
            eng = c.engine
            eng.connect()
            sid = eng.conn.session.opened.session_id
            assert eng.send_log[0][1:] == (pytest.approx(probe_rate), "probe")
            assert alloc.wait_idle(60)
            assert alloc._ara._ues[sid].send_mbps == pytest.approx(probe_rate)
            assert alloc.uplink_shares()[sid] == pytest.approx(probe_rate / CELL)  # ARA's share is the cap
            wait_until(lambda: eng.conn.session.uplink_share_mbps == pytest.approx(probe_rate), what="paced at the cap")
            wait_until(lambda: eng.conn.session.data_sender.active, what="the data channel")
            c(*example)
            assert c.last_report.uploaded_weight_bytes > 900_000 and not c.last_report.fallback
            longest = max(eng.uploads.uplink_samples(), key=lambda s: s["seconds"])
            assert longest["pace_mbps"] == pytest.approx(probe_rate)
            # its acknowledgements in order, each with the bytes up to its weight and that weight's handover
            acks = longest["acks"]
            assert len(acks) >= 2 and acks[-1][1] == longest["bytes"]
            assert acks[-1][0] == pytest.approx(longest["first_ack"][0] + longest["delivery_s"])
            assert all(a[0] <= b[0] and a[1] < b[1] and h is not None and h <= t for a, b, (t, _, h)
                       in zip(acks, acks[1:], acks[1:]))
            if sender_mbps is None:
                assert not longest["sender_bound"], longest
                # no sender-bound sample: no "sustained" rate; the send-cost estimate the given cost started
                # (a prior since session 18) may have moved with the request's own sends and been reported
                assert all(src == "probe" for _, _, src in eng.send_log), eng.send_log
                return
            assert longest["sender_bound"] and longest["handover_mbps"] < 1.05 * sender_mbps, longest
            assert len(eng.send_log) == 2, eng.send_log
            _, sustained, source = eng.send_log[1]
            assert source == "sustained" and sustained == pytest.approx(longest["mbps"])
            assert 0.6 * sender_mbps < sustained < 1.05 * sender_mbps
            assert abs(sustained - probe_rate) > SEND_UPDATE_MARGIN * probe_rate
            wait_until(lambda: alloc._ara._ues[sid].send_mbps == pytest.approx(sustained), what="the rate at ARA")
            assert alloc.wait_idle(60)
            assert alloc.uplink_shares()[sid] == pytest.approx(sustained / CELL)  # the new cap
            wait_until(lambda: eng.conn.session.uplink_share_mbps == pytest.approx(sustained),
                       what="the UE paced at its new share")
            c(*example)  # warm: nothing uploaded, nothing new measured
            assert c.last_report.uploaded_weight_bytes == 0 and len(eng.send_log) == 2
        finally:
            c.close()


def test_the_delivery_rate_is_taken_between_acknowledgements():
    """A period's first acknowledgement at 10.5 s after 100 kB, its last at 11.5 s after 1.1 MB: 8 Mbit/s
    delivered between them, whatever the fixed latency before the first (goodput over the whole sample:
    1.1 MB in 1.5 s). One acknowledgement: no delivery rate yet."""
    one = _sample(10.0, 100_000, 10.5, 1e6, (10.4, 1e6))
    assert one["delivery_mbps"] is None and one["first_ack"] == (10.5, 100_000)
    s = _sample(10.0, 1_100_000, 11.5, 1e6, (11.3, 1e6), one["first_ack"], one["acks"] + [(11.5, 1_100_000, 11.3)])
    assert s["delivery_mbps"] == pytest.approx(8.0) and s["delivery_s"] == pytest.approx(1.0)
    assert s["mbps"] == pytest.approx(1.1 * 8 / 1.5)
    # every acknowledgement with the bytes up to its weight and when that weight's last chunk left
    assert one["acks"] == [(10.5, 100_000, 10.4)] and s["acks"][-1] == (11.5, 1_100_000, 11.3)


def test_small_moves_of_the_probe_rate_are_sent_at_most_once_a_second(monkeypatch):
    """The probe's CPU-bound rate moves with every warm request's passive sample: a move of more than
    ``SEND_UPDATE_MARGIN`` is sent at once only when it is larger than ``SEND_UPDATE_JUMP`` or a sustained
    sample, else once ``SEND_UPDATE_MIN_S`` passed since the last update (each update re-plans the cell)."""
    from ue_client import send_rate as sr

    class Probe:
        rate = 10.0

        def ue_cpu(self):
            return UeCpu(1e3 / (self.rate * 125_000.0))  # ms of CPU per byte

    class Sess:
        def __init__(self):
            self.sent = []

        def update_profile(self, p):
            self.sent.append(p.send_mbps)
            return True

    now = [100.0]
    monkeypatch.setattr(sr.time, "monotonic", lambda: now[0])
    probe, sample = Probe(), [None]
    rep = sr.SendRateReport(probe, lambda: sample.pop() if sample[-1] is not None else None)
    s = Sess()
    assert rep.report(s) and s.sent == [pytest.approx(10.0)]  # the first on a session: at once
    probe.rate = 11.0  # +10 %: above the margin, below the jump, 0 s after the last update
    assert not rep.report(s)
    now[0] += sr.SEND_UPDATE_MIN_S
    assert rep.report(s) and s.sent[-1] == pytest.approx(11.0)
    probe.rate = 15.0  # +36 %: at once
    assert rep.report(s) and s.sent[-1] == pytest.approx(15.0)
    probe.rate = 15.5  # within the margin: never
    now[0] += 10
    assert not rep.report(s)
    sample[:] = [None, {"mbps": 16.0, "seconds": 1.0, "pace_mbps": 20.0, "handover_mbps": 16.0}]
    assert rep.report(s) and s.sent[-1] == pytest.approx(16.0)  # a sustained sample: at once
    assert len(s.sent) == 4


class ManyWeights(nn.Module):
    """``n`` small distinct weights (each its own upload)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(64, generator=g)) for _ in range(n)])

    def forward(self, x):
        for w in self.ws:
            x = x * w
        return x


def test_a_long_running_client_keeps_a_bounded_upload_history(monkeypatch):
    """Every busy period of the uplink is a goodput sample with its acknowledgements (``uplink_samples``),
    and every WeightStored is kept (``weight_acks``): a long-running client re-uploading after server
    evictions grew them without bound. Here 14 weights go up one busy period each, over a real session,
    with the bounds set to 8 periods, 3 acknowledgements and 12 WeightStored kept: only the latest periods stay
    (the last one is the last weight's), ``take_send_sample`` sees only kept periods, and each sample's ``acks``
    stays short."""
    from ue_client import uploads
    from ue_client.session import FOREGROUND

    monkeypatch.setattr(uploads, "MAX_WEIGHT_ACKS", 12, raising=False)
    n = 14  # each weight ~0.3 s over the session (the queue's quiet time): 14 past every bound (20 took ~6 s)
    module, example = ManyWeights(n).eval(), (torch.randn(64),)
    with ServerThread(config=CFG) as srv:
        c = CoinferClient(module, example, server=srv.address, policy="offload", probe=False, suspend_idle=False,
                          profile_runs=2, data_channel=False)
        try:
            eng = c.engine
            eng.connect()
            up, sess = eng.uploads, eng.conn.session
            up.max_periods, up.max_period_acks = 8, 3
            shas = list(up.sha_names)
            assert len(shas) == n
            for i, sha in enumerate(shas):
                up._put_weight(sha, (FOREGROUND, i, 0))
                wait_until(lambda sha=sha: sha in sess.held, what=f"weight {i} acknowledged")
                wait_until(lambda: not sess.queue.busy, what="the uplink idle")
                up.drain()
            samples = up.uplink_samples()
            assert len(samples) == 8, len(samples)
            last_mark = sess.queue.busy_marks[shas[-1]]
            assert samples[-1]["first_ack"][0] > last_mark[0] and samples[-1]["bytes"] == last_mark[1]
            assert all(len(s["acks"]) <= 2 * 3 for s in samples)
            assert len(up._fresh) <= 8 and set(up._fresh) <= set(up._periods)
            assert len(eng.weight_acks) == 12 and eng.weight_acks[-1].sha256 == shas[-1]
        finally:
            c.close()
