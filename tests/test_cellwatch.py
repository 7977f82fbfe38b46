"""testbed.cellwatch: the shared cell's per-UE htb counters over time, and the rate a class carried."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.cellwatch import (
    GOODPUT_PER_FRAME,
    class_rate,
    counter_at,
    load,
    parse_classes,
    parse_ss,
    sample_cell_rate,
    sample_window,
)
from testbed.netns import NetnsTestbed, call_in_netns, cell_classid, detect_mode
from testbed.tcptools import TrafficServer, upload

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]

TC_TEXT = """\
class htb 1:1 root rate 8365Kbit ceil 8365Kbit burst 1600b cburst 1600b
 Sent 13109556 bytes 9240 pkt (dropped 0, overlimits 926 requeues 0)
 backlog 0b 0p requeues 0
 lended: 4410 borrowed: 0 giants: 0
 tokens: 23908 ctokens: 23908

class htb 1:a parent 1:1 leaf 800a: prio 0 rate 130Kbit ceil 8365Kbit burst 5000b cburst 5000b
 Sent 3964387 bytes 2757 pkt (dropped 2, overlimits 199 requeues 0)
 backlog 27252b 18p requeues 0
 lended: 83 borrowed: 2674 giants: 0
 tokens: 4563461 ctokens: 70889
"""

SS_TEXT = """\
State Recv-Q Send-Q Local Address:Port Peer Address:Port Process
ESTAB 0      52013  10.77.0.1:32936    10.77.0.2:46371
\t cubic wscale:7,7 rto:227 rtt:26.218/1.2 mss:1448 cwnd:18 bytes_sent:1337458 bytes_acked:1337458 """ \
    """send 8.0Mbps pacing_rate 8359880bps delivery_rate 7580600bps busy:4728ms rwnd_limited:328ms(6.9%) """ \
    """unacked:18 retrans:0/1 notsent:52013
"""


def test_tc_and_ss_output_is_parsed():
    c = parse_classes(TC_TEXT.splitlines())
    assert c["1:1"] == [13109556, 9240, 0, 926, 0, 0]
    assert c["1:a"] == [3964387, 2757, 2, 199, 27252, 18]
    (conn,) = parse_ss(SS_TEXT)
    assert conn["local"] == "10.77.0.1:32936" and conn["peer"] == "10.77.0.2:46371"
    assert conn["cwnd"] == 18 and conn["unacked"] == 18 and conn["notsent"] == 52013 and conn["retrans"] == 1
    assert conn["rtt_ms"] == "26.218" and conn["delivery_rate"] == "7580600bps" and conn["rwnd_limited"] == 328


def _polls(points):
    """(t, sent bytes, backlog) -> polls of class 1:a."""
    return [{"t": t, "classes": {"1:a": [b, 0, 0, 0, q, 0]}} for t, b, q in points]


def test_a_class_rate_is_interpolated_between_polls():
    """The counter grows 10,000 bytes per 10 ms poll: between 1.005 and 1.505 s the class carried
    500,000 frame bytes (8 Mbit/s of frames, x 1448/1514 as goodput), whatever the windows' offsets
    against the polls; outside the polls there is no rate."""
    polls = _polls([(1.0 + i * 0.01, 10_000 * i, 1000 * (i % 7)) for i in range(101)])
    assert counter_at(polls, "1:a", 1.005) == pytest.approx(5_000)
    r = class_rate(polls, "1:a", 1.005, 1.505)
    assert r["bytes"] == pytest.approx(500_000) and r["seconds"] == pytest.approx(0.5)
    assert r["mbps"] == pytest.approx(8.0 * GOODPUT_PER_FRAME)
    assert r["max_backlog_bytes"] == 6000
    assert class_rate(polls, "1:a", 0.5, 1.5) is None and class_rate(polls, "1:a", 1.5, 1.5) is None
    assert class_rate(polls, "1:b", 1.1, 1.5) is None


def test_a_samples_window_is_its_first_to_its_last_handover():
    """A sample (``UploadScheduler.uplink_samples``) began 1.2 s before its last acknowledgement at 11.5 s;
    its last chunk was handed over at 11.3 s: the window is [10.3, 11.3]. Without handover times: none."""
    x = {"seconds": 1.2, "first_ack": (10.6, 50_000), "delivery_s": 0.9,
         "acks": [(10.6, 50_000, 10.45), (11.5, 1_000_000, 11.3)]}
    assert sample_window(x) == pytest.approx((10.3, 11.3))
    polls = _polls([(10.0 + i * 0.01, 10_000 * i, 0) for i in range(200)])
    assert sample_cell_rate(polls, "1:a", x)["bytes"] == pytest.approx(1_000_000)
    assert sample_window({**x, "acks": [(10.6, 50_000, None)]}) is None


@pytest.fixture
def need_htb():
    mode = detect_mode()
    if mode.network != "netns+tc" or not mode.htb:
        pytest.skip(f"network namespaces + tc htb not usable here: {mode.describe()}")


def test_the_watch_measures_what_a_ues_class_carried(need_htb, tmp_path):
    """A real cell (8 Mbit/s, UE 0's class enforced at 0.25: 2 Mbit/s), ``python -m testbed.cellwatch``
    polling it: over UE 0's upload of 600 kB the class carried the upload's bytes as frames (1514 per 1448
    of payload; measured 1.0465 x the payload) and about the enforced 2 Mbit/s in the upload's middle (htb
    itself: 1.98-2.22 over such windows, and the upload's own goodput 2.01-2.21);
    UE 1's class nothing; ss saw UE 0's connection to the server. SIGTERM ends the watch with a complete
    file."""
    with NetnsTestbed(shared_uplink_mbps=8.0) as tb:
        ues = [tb.add_ue(), tb.add_ue()]
        tb.set_uplink_share(ues[0], 0.25)
        srv = call_in_netns(tb.server_ns, TrafficServer, "0.0.0.0", 0)
        out = tmp_path / "cell.jsonl"
        watch = subprocess.Popen([sys.executable, "-m", "testbed.cellwatch", "--netns", tb.server_ns,
                                  "--ue-ns", ues[0].netns, "--ss-interval-ms", "100", "--out", str(out)],
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
                                 text=True)
        try:
            call_in_netns(ues[0].netns, upload, ues[0].srv_addr, srv.port, 100_000)  # the class's first burst
            time.sleep(0.5)
            t0 = time.perf_counter()
            r = call_in_netns(ues[0].netns, upload, ues[0].srv_addr, srv.port, 600_000)
            t1 = time.perf_counter()
            time.sleep(0.3)
        finally:
            watch.send_signal(signal.SIGTERM)
            _, err = watch.communicate(timeout=15)
            srv.close()
        assert r.sha_ok and watch.returncode == 0, err
    polls, sss = load(out)
    assert len(polls) >= 0.5 * (t1 - t0) / 0.01, len(polls)  # about one poll per 10 ms
    whole = class_rate(polls, cell_classid(0), t0 - 0.05, t1 + 0.2)
    assert 600_000 <= whole["bytes"] * GOODPUT_PER_FRAME <= 1.02 * 600_000, whole
    mid = class_rate(polls, cell_classid(0), t0 + 0.3 * (t1 - t0), t0 + 0.8 * (t1 - t0))
    assert abs(mid["mbps"] - 2.0) <= 0.3, mid
    assert class_rate(polls, cell_classid(1), t0, t1)["bytes"] == 0
    conns = [c for rec in sss for c in rec["ss"].get(ues[0].netns, [])]
    assert any(c["peer"] == f"{ues[0].srv_addr}:{srv.port}" for c in conns), conns[:3]
