"""Userspace link emulator: goodput vs rate, delay, integrity, concurrency, runtime changes, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from testbed.linkemu import (
    LinkEmulator,
    LinkEmulatorError,
    LinkEmulatorThread,
    LinkSpec,
    emulated_link,
    new_event_loop,
)
from testbed.tcptools import TrafficServer, download, ping, upload

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def traffic_server():
    """A TCP traffic sink/source (upload, download, echo, ping) behind the emulated links."""
    with TrafficServer() as srv:
        yield srv


def _bytes_for(mbps: float, seconds: float) -> int:
    return int(mbps * 1e6 / 8 * seconds)


def _timed(measure, ok, attempts: int = 3):
    """Run a timing measurement until ``ok(result)``, at most ``attempts`` times; return the last result.

    Why: on a shared 2-core machine another process can starve the test's threads for a few ms; a
    repeated failure is a real one, a single slow run is noise.
    """
    for _ in range(attempts):
        result = measure()
        if ok(result):
            break
    return result


@pytest.mark.parametrize("mbps", [20, 80])
def test_goodput_close_to_rate_both_directions(traffic_server, mbps):
    def in_range(r):
        assert r.sha_ok
        assert r.mbps <= 1.02 * mbps, f"{r.direction}: {r.mbps:.1f} Mbit/s above the {mbps} Mbit/s cap"
        return r.mbps >= 0.9 * mbps

    with emulated_link("127.0.0.1", traffic_server.port, uplink_mbps=mbps, downlink_mbps=mbps) as port:
        up = _timed(lambda: upload("127.0.0.1", port, _bytes_for(mbps, 0.6)), in_range)
        down = _timed(lambda: download("127.0.0.1", port, _bytes_for(mbps, 0.6)), in_range)
    for r in (up, down):
        assert in_range(r), f"{r.direction}: {r.mbps:.1f} Mbit/s for {mbps}"


def test_asymmetric_link_shapes_each_direction_separately(traffic_server):
    with emulated_link("127.0.0.1", traffic_server.port, uplink_mbps=20, downlink_mbps=None) as port:
        up = upload("127.0.0.1", port, _bytes_for(20, 0.4))
        down = download("127.0.0.1", port, _bytes_for(20, 0.4))
    assert up.mbps <= 20.4
    assert down.mbps > 100, "unlimited downlink must not be capped by the uplink rate"


def _rtts_ms(port: int, rtt_ms: float, attempts: int) -> list[float]:
    """25 small-message round trips (ms) through a relay of ``rtt_ms``; each attempt checks the floor (a
    delay is a floor on time: never faster than configured, whatever the load)."""

    def close_enough(rtts):
        assert min(rtts) >= rtt_ms - 0.5, rtts  # never faster than configured
        return statistics.median(rtts) <= rtt_ms + 3.0  # typically < 1 ms above

    with emulated_link("127.0.0.1", port, uplink_mbps=20, downlink_mbps=50, rtt_ms=rtt_ms) as relay:
        return _timed(lambda: [r * 1000 for r in ping("127.0.0.1", relay, 25)], close_enough, attempts)


@pytest.mark.parametrize("rtt_ms", [10, 40])
def test_small_message_rtt_is_never_below_the_configuration(traffic_server, rtt_ms):
    """Load-independent (the default run): every round trip takes at least the configured delay, so a
    relay that skipped it fails. How close the median sits above it depends on the machine's load
    (session 12: the window failed once at load 9): ``test_small_message_rtt_window``."""
    rtts = _rtts_ms(traffic_server.port, rtt_ms, attempts=1)
    assert min(rtts) >= rtt_ms - 0.5, rtts


@pytest.mark.slow
@pytest.mark.parametrize("rtt_ms", [10, 40])
def test_small_message_rtt_window(traffic_server, rtt_ms):
    """Timed (out of the default run): the median round trip within 3 ms above the configuration."""
    rtts = _rtts_ms(traffic_server.port, rtt_ms, attempts=3)
    assert statistics.median(rtts) <= rtt_ms + 3.0, rtts


def test_bulk_throughput_is_not_capped_by_delay(traffic_server):
    # A sleep per read would give at most chunk/delay = 64 KiB / 20 ms = 26 Mbit/s here.
    with emulated_link("127.0.0.1", traffic_server.port, uplink_mbps=80, rtt_ms=40) as port:
        ideal = 0.6 + 0.04
        r = _timed(lambda: upload("127.0.0.1", port, _bytes_for(80, 0.6)), lambda r: r.seconds <= ideal * 1.12)
    assert r.sha_ok
    assert r.seconds <= ideal * 1.12, f"{r.seconds:.3f} s for an ideal {ideal:.3f} s"


def _echo_roundtrip(port: int, nbytes: int) -> tuple[str, str]:
    """Send random bytes through an echo connection while reading the echo back; return both sha256."""
    payload = os.urandom(nbytes)
    got = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:

        def send():
            sock.sendall(b"E" + (0).to_bytes(8, "big"))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send)
        t.start()
        n = 0
        while chunk := sock.recv(1 << 20):
            got.update(chunk)
            n += len(chunk)
        t.join(20)
    return hashlib.sha256(payload).hexdigest(), got.hexdigest()


def test_integrity_both_ways_with_half_close(traffic_server):
    with emulated_link("127.0.0.1", traffic_server.port, uplink_mbps=200, downlink_mbps=150, rtt_ms=6) as port:
        sent, received = _echo_roundtrip(port, 3 * 1024 * 1024 + 17)
    assert sent == received


def test_many_concurrent_connections_are_independent(traffic_server):
    with LinkEmulatorThread("127.0.0.1", traffic_server.port, None, None, rtt_ms=4) as emu:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: _echo_roundtrip(emu.port, 300_000), range(24)))
        assert all(a == b for a, b in results)
        stats = emu.stats()
    assert stats.connections_total == 24
    assert stats.bytes_up == 24 * (9 + 300_000)  # header + payload
    assert stats.bytes_down == 24 * 300_000


def _parallel_uploads(port: int, n: int, nbytes: int):
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: upload("127.0.0.1", port, nbytes), range(n)))


def test_connections_do_not_share_a_bottleneck_by_default(traffic_server):
    def each_full_rate(results):
        return all(0.85 * 30 <= r.mbps <= 1.02 * 30 for r in results)

    with emulated_link("127.0.0.1", traffic_server.port, uplink_mbps=30) as port:
        results = _timed(lambda: _parallel_uploads(port, 2, _bytes_for(30, 0.5)), each_full_rate)
    assert each_full_rate(results), [r.mbps for r in results]


def test_shared_uplink_splits_the_rate(traffic_server):
    def run():
        t0 = time.perf_counter()
        results = _parallel_uploads(port, 2, _bytes_for(20, 0.5))
        return results, sum(r.nbytes for r in results) * 8 / (time.perf_counter() - t0) / 1e6

    def shared(outcome):
        results, total_mbps = outcome
        assert total_mbps <= 1.02 * 40, total_mbps
        # each got about half (start skew lets one run alone for a moment)
        return total_mbps >= 0.85 * 40 and all(0.6 * 20 <= r.mbps <= 1.5 * 20 for r in results)

    with emulated_link("127.0.0.1", traffic_server.port, uplink_mbps=40, shared_uplink=True) as port:
        outcome = _timed(run, shared)
    assert shared(outcome), ([r.mbps for r in outcome[0]], outcome[1])


def _set_link_scenario(port: int, attempts: int):
    """80 Mbit/s and no delay, then ``set_link`` to 20 Mbit/s / 20 ms: (fast, slow, min rtt s, spec, stats)."""
    with LinkEmulatorThread("127.0.0.1", port, uplink_mbps=80, rtt_ms=0) as emu:
        fast = _timed(lambda: upload("127.0.0.1", emu.port, _bytes_for(80, 0.3)), lambda r: r.mbps >= 72, attempts)
        before = emu.stats()
        spec = emu.set_link(uplink_mbps=20, rtt_ms=20)
        slow = _timed(lambda: upload("127.0.0.1", emu.port, _bytes_for(20, 0.3)), lambda r: r.mbps >= 18, attempts)
        rtt = min(ping("127.0.0.1", emu.port, 10))
        assert emu.set_link(downlink_mbps=5).uplink_mbps == 20  # omitted settings are kept
        time.sleep(0.05)
        after = emu.stats()
    return fast, slow, rtt, spec, before, after


def test_set_link_changes_rate_and_delay_at_runtime(traffic_server):
    """Load-independent: the new settings are in force (a delay and a rate cap are floors on time, so
    a loaded machine can only make the transfer slower), and the relay's counters saw every byte."""
    fast, slow, rtt, spec, before, after = _set_link_scenario(traffic_server.port, attempts=1)
    assert spec == LinkSpec(20, None, 20)
    assert fast.sha_ok and slow.sha_ok
    assert fast.mbps <= 81.6 and slow.mbps <= 20.4
    assert rtt >= 0.0195
    assert before.bytes_up >= fast.nbytes and after.bytes_up - before.bytes_up >= slow.nbytes
    assert after.connections_total >= 3 and after.connections_active == 0


@pytest.mark.slow
def test_set_link_rate_and_delay_windows(traffic_server):
    """Timed (out of the default run): the measured rates and the round trip sit close to the settings."""
    fast, slow, rtt, _spec, _before, _after = _set_link_scenario(traffic_server.port, attempts=3)
    assert 72 <= fast.mbps <= 81.6
    assert 18 <= slow.mbps <= 20.4
    assert 0.0195 <= rtt <= 0.023


def test_counters_count_delivered_bytes(traffic_server):
    with LinkEmulatorThread("127.0.0.1", traffic_server.port, uplink_mbps=100) as emu:
        upload("127.0.0.1", emu.port, 100_000)
        download("127.0.0.1", emu.port, 50_000)
        time.sleep(0.05)
        stats = emu.stats()
    assert stats.bytes_up == (9 + 100_000) + 9
    assert stats.bytes_down == 32 + (50_000 + 32)
    assert stats.connections_total == 2 and stats.connections_active == 0


def _bound_port(s: socket.socket) -> int:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_target_closes_the_client():
    # bound, never listening: a connection is refused, and no other process can take the port meanwhile (a port
    # closed before the relay connects can be taken by another process's listener; then the relay connects and
    # the client waits: the likely cause of one 5 s timeout in session 29's CI beside parallel load)
    with socket.socket() as s, LinkEmulatorThread("127.0.0.1", _bound_port(s)) as emu:
        with (
            socket.create_connection(("127.0.0.1", emu.port), timeout=5) as c,
            contextlib.suppress(ConnectionResetError),
        ):
            assert c.recv(10) == b""
        deadline = time.monotonic() + 2
        while emu.stats().connect_failures == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert emu.stats().connect_failures == 1


def test_invalid_settings_raise_typed_errors():
    with pytest.raises(LinkEmulatorError, match="uplink_mbps"):
        LinkSpec(uplink_mbps=0)
    with pytest.raises(LinkEmulatorError, match="rtt_ms"):
        LinkSpec(rtt_ms=-1)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        emu = LinkEmulatorThread("127.0.0.1", 1, listen_port=busy.getsockname()[1])
        with pytest.raises(LinkEmulatorError, match="cannot listen"):
            emu.start()
        emu.stop()  # no-op after a failed start
    with pytest.raises(LinkEmulatorError, match="not running"):
        emu.set_link(uplink_mbps=1)


def _relay_sockets(relay_port: int, target_port: int) -> list:
    return [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if (c.laddr and c.laddr.port == relay_port) or (c.raddr and c.raddr.port == target_port)
    ]


def test_stop_cancels_tasks_and_closes_sockets_mid_transfer(traffic_server):
    async def scenario():
        emu = LinkEmulator("127.0.0.1", traffic_server.port, uplink_mbps=5, downlink_mbps=5, rtt_ms=30)
        port = await emu.start()
        clients = []
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"U" + (10_000_000).to_bytes(8, "big") + os.urandom(500_000))  # stuck mid-transfer
            clients.append((r, w))
        await asyncio.sleep(0.2)
        assert emu.stats.connections_active == 3
        await emu.stop()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        for r, w in clients:  # the relay aborted them: the clients see a reset (or EOF)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        return port, others, emu.stats

    loop = new_event_loop()
    try:
        port, leftover_tasks, stats = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert leftover_tasks == set()
    assert stats.connections_active == 0
    deadline = time.monotonic() + 3
    while _relay_sockets(port, traffic_server.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _relay_sockets(port, traffic_server.port) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_thread_wrapper_stops_its_thread_with_live_connections(traffic_server):
    emu = LinkEmulatorThread("127.0.0.1", traffic_server.port, uplink_mbps=1)
    port = emu.start()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"U" + (10**7).to_bytes(8, "big") + b"x" * 200_000)
    time.sleep(0.1)
    emu.stop()
    emu.stop()  # idempotent
    assert not any(t.name == "linkemu" for t in threading.enumerate())
    sock.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(10) == b""
    sock.close()


def test_cli_prints_port_relays_and_stops_on_sigterm(traffic_server):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testbed.linkemu",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"127.0.0.1:{traffic_server.port}",
            "--uplink-mbps",
            "50",
            "--rtt-ms",
            "10",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert statistics.median(ping("127.0.0.1", port, 5)) >= 0.0095
        assert upload("127.0.0.1", port, 200_000).sha_ok
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


def _grpc_round_trips_s() -> list[float]:
    """Five unary health checks (s) on a warm gRPC channel through a 30 ms relay."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (
            emulated_link("127.0.0.1", grpc_port, uplink_mbps=20, rtt_ms=30) as port,
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connection setup
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                times.append(time.perf_counter() - t0)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)
    return times


def test_grpc_channel_through_the_relay_sees_the_delay():
    """Load-independent: one unary call on a warm channel is at least one round trip of the relay."""
    times = _grpc_round_trips_s()
    assert min(times) >= 0.0295, times


@pytest.mark.slow
def test_grpc_round_trip_window():
    """Timed (out of the default run): the median call within 15 ms above the relay's 30 ms."""
    times = _grpc_round_trips_s()
    assert min(times) >= 0.0295 and statistics.median(times) <= 0.045, times


def test_relay_before_a_shaper_holds_only_its_delay_line(traffic_server):
    """A delay relay (unlimited rate) in front of a 20 Mbit/s shaper: given that rate (``behind_mbps``) it
    holds at most delay x rate + 128 KiB (+ the one read that passes it); without it, it soaks up what the
    shaper has not taken yet (megabytes in a bulk transfer: a queue in front of the link's own)."""
    cap = int(20 * 1e6 / 8 * 0.010) + 3 * 64 * 1024
    queued = {}
    with LinkEmulatorThread("127.0.0.1", traffic_server.port, uplink_mbps=20.0) as shaper:
        for behind in (None, 20.0):
            with LinkEmulatorThread("127.0.0.1", shaper.port, rtt_ms=20.0, behind_mbps=(behind, None)) as relay:
                res = upload("127.0.0.1", relay.port, 3_000_000)
                queued[behind] = relay.stats().max_queued_bytes
            assert res.sha_ok
    assert queued[20.0] <= cap, queued
    assert queued[None] > 2 * cap, queued
