"""The send rate a UE reports to the server's allocator (``UeProfile.send_mbps``, ARA's cap on its uplink
share) is one it sustains: its probe's CPU-bound rate discounted (``PROBE_SEND_DISCOUNT``) until an upload
measured it, then the goodput of its latest upload that fell short of its pace (it could not sustain it), sent
again on the session (``SessionRequest.profile``) when it moved by more than ``SEND_UPDATE_MARGIN``.

Real server on port 0 with ARA, a real client, the uplink shaped by the userspace link emulator (the
emulated link stands in for a UE too slow to send at its pace: either way its goodput falls short of it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner.uecpu import UeCpu
from testbed.linkemu import LinkEmulatorThread
from tests.waiting import wait_until
from ue_client.client import PROBE_SEND_DISCOUNT, SEND_UPDATE_MARGIN, CoinferClient
from ue_client.uploads import BELOW_PACE, _sample

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB)
CELL = 16.0


def test_a_sample_is_below_pace_only_when_its_goodput_falls_short_of_the_pace():
    """1 MB acknowledged 2.1 s after its first chunk at a pace of 8 Mbit/s (3.8 Mbit/s): below the pace;
    in 1.05 s (7.6): kept up; just above ``BELOW_PACE`` x the pace: kept up; unpaced (no pace to fall
    short of): never. The handover rate is bytes over the time to the last chunk handed over."""
    s = _sample(10.0, 1_000_000, 12.1, 1e6, (12.0, 1e6))
    assert s["handover_mbps"] == pytest.approx(4.0) and s["pace_mbps"] == pytest.approx(8.0)
    assert s["below_pace"] and s["mbps"] == pytest.approx(8 / 2.1) and s["share_mbps"] == pytest.approx(8.0)
    assert not _sample(10.0, 1_000_000, 11.05, 1e6, (11.0, 1e6))["below_pace"]
    edge = 8.0 * BELOW_PACE * 1.01  # goodput just above the bound
    assert not _sample(10.0, 1_000_000, 10.0 + 8 / edge, 1e6, (10.5, 1e6))["below_pace"]
    assert _sample(10.0, 1_000_000, 10.0 + 8 / (edge / 1.02), 1e6, (10.5, 1e6))["below_pace"]
    assert not _sample(10.0, 1_000_000, 12.1, None, (12.0, None))["below_pace"]
    assert not _sample(10.0, 1_000_000, 12.1, None, None)["below_pace"]


def _model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Four 3x3 convs (~450 kB of weights): about 0.9 s of upload at 4 Mbit/s."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers).eval(), (torch.randn(1, 3, 16, 16),)


@pytest.mark.parametrize("link_mbps", [4.0, None])
def test_the_ue_reports_the_send_rate_it_sustained_and_ara_caps_its_share_there(link_mbps):
    """ARA (every UE offloading) on a 16 Mbit/s cell; the UE's probe says it sends 10 Mbit/s, so it reports
    8.5 (x ``PROBE_SEND_DISCOUNT``) and ARA's share for it is the cap 8.5 / 16, which it paces to.

    Through a 4 Mbit/s link it cannot sustain that pace: its upload's goodput is below it, and after the
    request it reports the goodput it measured (~3.7 Mbit/s) on the session; ARA's share becomes that
    rate / 16 (the cap), the UE is told so and paces there. A warm request after it uploads nothing and
    sends no update. Unshaped (loopback) it keeps up with 8.5 Mbit/s: no sample below the pace, no update.
    """
    module, example = _model()
    alloc = AraShareAllocator(policy="offload")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        relay = None
        addr = srv.address
        if link_mbps is not None:
            relay = LinkEmulatorThread("127.0.0.1", srv.port, link_mbps, None, 0.0)
            relay.start()
            addr = f"127.0.0.1:{relay.port}"
        probe_rate = 10.0
        c = CoinferClient(module, example, server=addr, policy="offload", cell_uplink_mbps=CELL, probe=False,
                          send_cpu=UeCpu(1.0 / (probe_rate * 125.0)), suspend_idle=False, profile_runs=2)
        try:
            eng = c.engine
            eng.connect()
            sid = eng.conn.session.opened.session_id
            first = probe_rate * PROBE_SEND_DISCOUNT
            assert eng.send_log[0][1:] == (pytest.approx(first), "probe")
            assert alloc.wait_idle(60)
            assert alloc._ara._ues[sid].send_mbps == pytest.approx(first)
            assert alloc.uplink_shares()[sid] == pytest.approx(first / CELL)  # ARA's share is the cap
            wait_until(lambda: eng.conn.session.uplink_share_mbps == pytest.approx(first), what="paced at the cap")
            c(*example)
            assert c.last_report.uploaded_weight_bytes > 400_000 and not c.last_report.fallback
            samples = eng.uploads.uplink_samples()
            longest = max(samples, key=lambda s: s["seconds"])
            assert longest["pace_mbps"] == pytest.approx(first)
            if link_mbps is None:
                assert not longest["below_pace"], longest
                assert len(eng.send_log) == 1  # nothing measured: the probe's rate stands
                return
            assert longest["below_pace"] and longest["mbps"] < link_mbps * 1.05, longest
            assert len(eng.send_log) == 2, eng.send_log
            _, sustained, source = eng.send_log[1]
            assert source == "sustained" and 0.6 * link_mbps < sustained < 1.05 * link_mbps
            assert abs(sustained - first) > SEND_UPDATE_MARGIN * first
            wait_until(lambda: alloc._ara._ues[sid].send_mbps == pytest.approx(sustained), what="the rate at ARA")
            assert alloc.wait_idle(60)
            assert alloc.uplink_shares()[sid] == pytest.approx(sustained / CELL)  # the new cap
            wait_until(lambda: eng.conn.session.uplink_share_mbps == pytest.approx(sustained),
                       what="the UE paced at its new share")
            c(*example)  # warm: nothing uploaded, nothing new measured
            assert c.last_report.uploaded_weight_bytes == 0 and len(eng.send_log) == 2
        finally:
            c.close()
            if relay is not None:
                relay.stop()
