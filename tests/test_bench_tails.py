"""Tail latency in the bench: p95/p99 per cell, per-request diagnostics (server timings, TCP counters, the
delay relay's stalls) and the tails line that names every warm remote request above 3x its prediction."""

from __future__ import annotations

import json
import random
import socket
import statistics
import time
from pathlib import Path

import pytest

from testbed import tcpstats
from testbed.bench.report import TAIL_FACTOR, tails_summary, warm_remote_requests, write_markdown
from testbed.bench.suite import quantile, request_details, stream_rows
from testbed.linkemu import LinkEmulatorThread, LinkStats
from testbed.tcptools import TrafficServer

T0 = 1_800_000_000.0  # a fixed wall clock for the fake requests


def _req(i: int, ms: float, pred: float, ops: int, *, up: int = 0, st: dict | None = None, tcp: dict | None = None,
         fallback: bool = False) -> dict:
    return {"i": i, "t_wall": T0 + 10 * i, "latency_ms": ms, "predicted_ms": pred, "server_ops": ops,
            "fallback": fallback, "uploaded_bytes": up, "upload_ms": 0.0, "ue_compute_ms": 9.0, "cpu_ms": 11.0,
            "server_timings": st, "tcp": tcp, "load1": 1.5, "new_slice": i == 2}


TIMINGS = {"total_ms": 20.0, "compute_ms": 18.0, "input_wait_ms": 1.0, "weight_wait_ms": 0.0, "queue_ms": 1.0}
QUIET = {"ue": {"ActiveOpens": 1}, "server": {}}


def fake_cell() -> dict:
    """One cell: coinfer's third request stalls 2 s with an RTO in the UE's namespace and a relay stall."""
    co = [_req(0, 300, 290, 60, up=9_000_000, st=TIMINGS, tcp=QUIET),
          _req(1, 65, 60, 60, st=TIMINGS, tcp=QUIET),
          _req(2, 2000, 61, 60, st=TIMINGS, tcp={"ue": {"RetransSegs": 2, "TCPTimeouts": 1, "ActiveOpens": 1},
                                                  "server": {}}),
          _req(3, 64, 60, 60, st=TIMINGS, tcp=QUIET)]
    ns = [_req(0, 900, 880, 50, up=9_000_000, st=TIMINGS), _req(1, 190, 60, 50, st=None, fallback=True),
          _req(2, 62, 60, 50, st=TIMINGS), _req(3, 61, 60, 50, st=TIMINGS)]
    local = [_req(i, 250 + i, 250, 0) for i in range(4)]
    return {
        "streams": {"local": {"requests": local}, "neurosurgeon-serial": {"requests": ns},
                    "coinfer": {"requests": co}},
        "warm": {"coinfer": {"requests": [_req(0, 60, 58, 60, st=TIMINGS), _req(1, 59, 58, 60, st=TIMINGS)]}},
        # one stall inside coinfer's slow request (it ran from T0 + 20 s for 2 s), one long after it
        "relay": {"max_queued_bytes": 70_000, "max_late_ms": 60.0, "max_drain_ms": 1500.0,
                  "stalls": [[T0 + 20.5, "up", "drain", 1500.0, 70_000], [T0 + 25.0, "down", "late", 60.0, 10]]},
    }


def test_quantile_is_linear_interpolation() -> None:
    rng = random.Random(7)
    for n in (1, 2, 4, 9, 40):
        xs = [rng.uniform(0, 1000) for _ in range(n)]
        for q in (0.0, 0.5, 0.95, 0.99, 1.0):
            if n >= 2:  # statistics' "inclusive" method is the same type-7 quantile
                ref = statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1] if 0 < q < 1 else (
                    min(xs) if q == 0 else max(xs))
            else:
                ref = xs[0]
            assert quantile(xs, q) == pytest.approx(ref)
    assert quantile([], 0.95) is None and quantile([None, 5.0], 0.99) == 5.0
    # four requests: p95 and p99 lie between the two slowest, the higher closer to the slowest
    assert quantile([60, 61, 62, 2000], 0.95) == pytest.approx(62 + 0.85 * 1938)


def test_rows_carry_tails_and_per_request_diagnostics() -> None:
    rows = stream_rows(fake_cell(), "torchvision:mobilenet_v2", 0.1, 400.0, 20.0, 4)
    co = next(r for r in rows if r["scenario"] == "stream" and r["policy"] == "coinfer")
    assert co["p95_ms"] == pytest.approx(quantile([300, 65, 2000, 64], 0.95))
    assert co["p99_ms"] == pytest.approx(quantile([300, 65, 2000, 64], 0.99))
    assert co["p95_ms"] < co["p99_ms"] < 2000
    assert co["server_timings_per_request"] == [TIMINGS] * 4
    # only loss/retransmit counters are kept; opens are normal
    assert co["tcp_per_request"][2] == {"ue": {"RetransSegs": 2, "TCPTimeouts": 1}, "server": {}}
    assert co["tcp_per_request"][1] == {"ue": {}, "server": {}}
    assert (co["relay_max_queued_bytes"], co["relay_max_late_ms"], co["relay_max_drain_ms"]) == (70_000, 60.0, 1500.0)
    assert co["relay_stalls_per_request"] == [[], [], [[T0 + 20.5, "up", "drain", 1500.0, 70_000]], []]
    warm = next(r for r in rows if r["scenario"] == "warm" and r["policy"] == "coinfer")
    assert warm["p99_ms"] == pytest.approx(quantile([60, 59], 0.99)) and warm["server_ops"] == [60, 60]
    json.dumps(rows)


def test_warm_remote_requests_exclude_uploads_local_and_fallbacks() -> None:
    rows = stream_rows(fake_cell(), "torchvision:mobilenet_v2", 0.1, 400.0, 20.0, 4)
    got = sorted((r["scenario"], r["policy"], i) for r, i in warm_remote_requests(rows))
    assert got == [("stream", "coinfer", 1), ("stream", "coinfer", 2), ("stream", "coinfer", 3),
                   ("stream", "neurosurgeon-serial", 2), ("stream", "neurosurgeon-serial", 3),
                   ("warm", "coinfer", 0), ("warm", "coinfer", 1)]


def test_tails_line_names_the_stall_and_its_cause(tmp_path: Path) -> None:
    rows = stream_rows(fake_cell(), "torchvision:mobilenet_v2", 0.1, 400.0, 20.0, 4)
    lines = tails_summary(rows)
    assert lines[0] == "### Tails"
    assert f"above {TAIL_FACTOR:g}x their prediction: 1 of 7" in lines[2]
    stall = lines[3]
    assert "mobilenet_v2 10 % 400 Mbps coinfer request #3: 2000 ms vs predicted 61 ms" in stall
    assert "server 20 ms" in stall and "UE compute 9 ms" in stall and "unaccounted 1971 ms" in stall
    assert "ue: RetransSegs 2, TCPTimeouts 1" in stall and "relay up drain 1500 ms" in stall
    assert "machine load 1.5" in stall and "first request on a new slice" in stall
    assert "slice validation" not in stall  # this row's timings have no validation_ms (before session 8)
    # a row since session 8: the server measured the slice's validation, named instead of inferred
    cell = fake_cell()
    cell["streams"]["coinfer"]["requests"][2]["server_timings"] = {**TIMINGS, "validation_ms": 1800.0}
    stall = tails_summary(stream_rows(cell, "torchvision:mobilenet_v2", 0.1, 400.0, 20.0, 4))[3]
    assert "slice validation 1800 ms" in stall and "first request on a new slice" not in stall, stall
    # the table beside the means, and the tails line, in results.md
    write_markdown(rows, {"command": "x", "complete": True}, tmp_path / "results.md")
    text = tmp_path / "results.md"
    md = text.read_text()
    table = md.split("mean / p95 / p99")[1].split("###")[0]
    line = next(x for x in table.splitlines() if x.startswith("| mobilenet_v2"))
    cells = [c.strip() for c in line.split("|")]
    co = next(r for r in rows if r["scenario"] == "stream" and r["policy"] == "coinfer")
    assert cells[-2] == f"{co['mean_ms']:.0f} / {co['p95_ms']:.0f} / {co['p99_ms']:.0f}"
    assert "### Tails" in md and "TCPTimeouts 1" in md


def test_no_tail_line_when_nothing_is_slow_and_old_rows_still_render() -> None:
    cell = fake_cell()
    cell["streams"]["coinfer"]["requests"][2]["latency_ms"] = 150.0  # < 3 x 61
    rows = stream_rows(cell, "torchvision:mobilenet_v2", 0.1, 400.0, 20.0, 4)
    assert "0 of 7" in tails_summary(rows)[2] and len(tails_summary(rows)) == 4
    old = [{k: v for k, v in r.items() if not k.endswith("_per_request") or k == "predicted_per_request_ms"}
           for r in rows]
    for r in old:
        r["latency_ms"] = [x * 10 for x in r.get("latency_ms") or []]
    lines = tails_summary(old)
    assert any("not recorded" in x for x in lines)
    # an old multi-UE row: its first request uploaded, so it is not a warm one
    multi = {"scenario": "multi_ue", "policy": "coinfer", "model": "m", "ue_cpu": 0.1, "uplink_mbps": 1.0,
             "latency_ms": [900.0, 100.0], "predicted_per_request_ms": [100.0, 100.0]}
    assert [i for _, i in warm_remote_requests([multi])] == [1]


def test_request_details_without_diagnostics() -> None:
    d = request_details([{"latency_ms": 5.0}], None)
    assert d["server_timings_per_request"] == [None] and d["tcp_per_request"] == [None]
    assert d["relay_stalls_per_request"] == [[]]
    # a serial baseline's first request: its upload ran before the call; stalls count from the upload's start
    first = {"t_wall": T0, "upload_ms": 1000.0, "call_ms": 100.0, "latency_ms": 1100.0}
    during_upload, after_call = [T0 - 0.5, "up", "drain", 80.0, 1], [T0 + 0.5, "up", "drain", 80.0, 1]
    d = request_details([first], {"stalls": [during_upload, after_call]})
    assert d["relay_stalls_per_request"] == [[during_upload]]


# ---- TCP counters ------------------------------------------------------------------------------------

SNMP = """Ip: Forwarding DefaultTTL
Ip: 1 64
Tcp: RtoAlgorithm RtoMin ActiveOpens RetransSegs
Tcp: 1 200 17 5
"""
NETSTAT = """TcpExt: SyncookiesSent TCPTimeouts TCPLossProbes
TcpExt: 0 3 4
IpExt: InNoRoutes
IpExt: 0
"""


def test_parse_proc_counters() -> None:
    assert tcpstats._parse_pairs(SNMP, ("Tcp",)) == {"RtoAlgorithm": 1, "RtoMin": 200, "ActiveOpens": 17,
                                                     "RetransSegs": 5}
    assert tcpstats._parse_pairs(NETSTAT, ("TcpExt",)) == {"SyncookiesSent": 0, "TCPTimeouts": 3, "TCPLossProbes": 4}
    d = tcpstats.delta({"RetransSegs": 5, "TCPTimeouts": 3, "ActiveOpens": 1}, {"RetransSegs": 7, "TCPTimeouts": 3,
                                                                              "ActiveOpens": 2})
    assert d == {"RetransSegs": 2, "ActiveOpens": 1}
    assert tcpstats.losses(d) == {"RetransSegs": 2}


def test_counters_of_this_namespace_see_a_real_connection() -> None:
    c = tcpstats.NamespaceCounters({"here": "self", "gone": 2**22 + 12345})
    before = c.snap()
    assert set(before) == {"here"} and set(c.pids) == {"here"}  # an unreadable namespace is dropped once
    assert {"RetransSegs", "TCPTimeouts", "ActiveOpens"} <= set(before["here"])
    with TrafficServer() as srv:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", srv.port)):
                pass
    after = c.snap()
    moved = c.diff(before, after)["here"]
    assert moved.get("ActiveOpens", 0) >= 3  # other processes of this namespace may open more


# ---- the delay relay's stalls ----------------------------------------------------------------------------


def test_relay_records_a_late_delivery_when_its_loop_is_blocked() -> None:
    """Data in the relay's delay line while its event loop is blocked arrives late: the relay says so."""
    # 500 ms each way: the relay has long read the bytes (and holds them) when its loop blocks 200 ms in
    with TrafficServer() as srv, LinkEmulatorThread("127.0.0.1", srv.port, rtt_ms=1000.0) as emu:
        for _ in range(3):  # retried: a starved relay thread may not have read them even then
            with socket.create_connection(("127.0.0.1", emu.port)) as s:
                s.sendall(b"E" + (0).to_bytes(8, "big") + b"x" * 1000)  # echo
                time.sleep(0.2)
                emu._call(lambda: time.sleep(0.6))  # the relay's loop blocked for 600 ms
                got = b""
                while len(got) < 1000:
                    got += s.recv(4096)
            stats = emu.stats()
            if any(kind == "late" for _, _, kind, _, _ in stats.stalls):
                break
    late = [x for x in stats.stalls if x[2] == "late"]
    assert late and late[0][3] > 100.0 and stats.max_late_ms >= late[0][3] - 0.1  # stalls are rounded
    assert stats.max_queued_bytes >= 1000
    snap = stats.snapshot()
    assert snap.stalls == stats.stalls and snap.stalls is not stats.stalls


def test_link_stats_defaults() -> None:
    s = LinkStats()
    assert s.stalls == [] and s.max_late_ms == 0.0 and s.snapshot().stalls is not s.stalls
