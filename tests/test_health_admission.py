"""The health service's own admission budget (``edge_server.health_admission``, session 25): a tokenless prober (a
load balancer's, a k8s probe) is answered while a client floods bad-token calls from the same address, and a health
flood is paced on its own. Real servers on port 0 with real grpc clients; every flood is bounded in count and ends
(cancelled) with its test."""

from __future__ import annotations

import contextlib
import threading
import time
import types

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_server.config import MiB, ServerConfig
from edge_server.runtime import STRANGER_BUDGET_DIVISOR
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack21 import _md, _server

SERVING = health_pb2.HealthCheckResponse.SERVING
BAD = (("authorization", "Bearer not-a-valid-token"),)


def _until(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.02)


def _budget_server(tmp_path, **config):
    """Tokens on, two server-wide reading slots (so each call's receive window is held in the budget) and about
    160 MiB for work in flight beside this process: the strangers' pool is ~18 windows, filled by a few dozen calls.
    The tarpit holds a stranger's refusals after a burst of 2, one answer per 0.2 s."""
    rss = psutil.Process().memory_info().rss
    return _server(tmp_path, memory_bytes=rss + (16 + 16 + 32 + 160) * MiB, max_reading_bytes=16 * MiB,
                   tarpit_rate=5, tarpit_burst=2, **config)


def _check(ch, timeout: float = 5.0, metadata=()) -> str:
    try:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout, metadata=metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as e:
        return e.code().name


def test_a_tokenless_prober_is_answered_while_bad_token_calls_fill_the_strangers_pool(tmp_path):
    """A client at 127.0.0.1 sends 60 bad-token Hellos without waiting for the answers: those past the tarpit's burst
    wait there, each holding its receive window in the pool all callers without a token share, until the pool is
    full (the rest are refused at once). A prober at the same address, without a token, then Checks 8 times.
    Before: its Checks' windows went into the same full pool, every one RESOURCE_EXHAUSTED ("callers without a token
    may hold at most ... together"; session 23's "7 of 8"). Now they hold the health service's own budget: SERVING,
    and the flood was given nothing more (the pool stays at its cap)."""
    with _budget_server(tmp_path) as srv, grpc.insecure_channel(srv.address) as flood_ch, \
            grpc.insecure_channel(srv.address) as probe_ch:
        mem, window = srv.runtime.memory, srv.runtime.calls.window_bytes
        cap = mem.limit_bytes // STRANGER_BUDGET_DIVISOR
        assert window > 0 and cap // window < 40, (window, cap)  # 60 calls are enough to fill it
        hello = pbg.EdgeServiceStub(flood_ch).Hello
        flood = [hello.future(pb.HelloRequest(client_version="flood"), metadata=BAD, timeout=60) for _ in range(60)]
        try:
            # the pool is full: one more window does not fit (a condition, not a time: however slow the machine)
            _until(lambda: mem.pooled_bytes() + window > cap)
            codes = [_check(probe_ch) for _ in range(8)]
            assert codes == ["SERVING"] * 8, codes
            assert mem.pooled_bytes() <= cap
            assert mem.pooled_bytes() + window > cap  # still full: the probes took none of it
        finally:
            for f in flood:
                f.cancel()
        assert {f.exception().code() for f in flood if f.done() and not f.cancelled()} <= {
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED}
        _until(lambda: srv.runtime.health.held() == 0 and mem.pooled_bytes() == 0)


def test_a_health_flood_is_paced_and_a_tenants_pings_are_not(tmp_path):
    """Health Checks without a token from 127.0.0.1 on 4 threads, each sent when the thread's last is answered, for
    2 s: the host gets its burst at once, then one answer per 1 / HEALTH_RATE s, whatever the machine's speed (a
    slower one only lowers the count). Before: every one at once (one thread got ~940 per s, 0.45-0.6 of a core of
    the server, ``docs/results/attack/session25/``). Meanwhile a tenant's pings (Checks with its token) from the
    same address are its own, never paced."""
    from concurrent.futures import ThreadPoolExecutor

    from edge_server.health_admission import HEALTH_BURST, HEALTH_RATE

    seconds, threads = 2.0, 4

    def flood(address: str) -> int:
        n, end = 0, time.monotonic() + seconds
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while (left := end - time.monotonic()) > 0:
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=left)
                    n += 1
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e  # still waiting for its slot at the end
                    break
        return n

    with _budget_server(tmp_path) as srv, grpc.insecure_channel(srv.address) as ch:
        pacing = srv.runtime.health.pacing
        with ThreadPoolExecutor(threads) as pool:
            answered = sum(pool.map(flood, [srv.address] * threads))
        assert answered <= HEALTH_BURST + HEALTH_RATE * seconds + threads + 2, answered
        assert pacing.delayed > 0  # (4 callers outran 10 per s: each needs a round trip under 0.2 s)
        delayed = pacing.delayed
        for _ in range(HEALTH_BURST + 5):  # a tenant's pings: more than a burst, none waits for a slot
            assert _check(ch, metadata=_md("alice")) == "SERVING"
        assert pacing.delayed == delayed

        async def snap():
            return srv.runtime.metrics_snapshot()["server"]

        server = srv.call(snap())  # what /metrics shows (coinfer_health_*)
        assert server["health_calls_paced"] == delayed
        assert server["health_budget_bytes"] == srv.runtime.health.budget_bytes > 0
        assert 0 <= server["health_reserved_bytes"] <= server["health_budget_bytes"]


def test_without_tokens_health_calls_are_the_clients_own_and_not_paced(tmp_path):
    """Without --auth-tokens every client is tokenless, the UEs' pings too (several a second each): no pacing, no
    budget of their own (held in the server's budget under their address, as before)."""
    from edge_server.config import ServerConfig
    from edge_server.health_admission import HEALTH_BURST
    from edge_server.testing import ServerThread

    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, max_reading_bytes=16 * MiB)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        assert srv.runtime.health.pacing is None and srv.runtime.health.budget is None
        assert all(_check(ch) == "SERVING" for _ in range(HEALTH_BURST + 5))


def test_health_budget_routing_and_carving():
    from edge_server.health_admission import HealthAdmission
    from edge_server.memory import MemoryBudget

    main = MemoryBudget(800 << 20)
    main.pool("peer:", 100 << 20)
    adm = HealthAdmission(main, 1 << 20, strangers=True, windows=8, host_fraction=0.25)
    assert adm.budget_bytes == 8 << 20 and main.limit_bytes == 792 << 20  # carved off the server's budget
    held = [adm.reserve("peer:10.0.0.1", 1 << 20, "w") for _ in range(2)]  # a host: a quarter of 8 windows
    try:
        adm.reserve("peer:10.0.0.1", 1 << 20, "w")
        raise AssertionError("over the host's share")
    except Exception as e:
        assert type(e).__name__ == "ResourceExhausted"
    assert main.pooled_bytes() == 0 and adm.held() == 2 << 20  # the strangers' pool untouched
    tenant = adm.reserve("tenant:alice", 1 << 20, "w")  # a token's health call is its tenant's, in the server's
    assert main.held_by("tenant:alice") == 1 << 20 and adm.held() == 2 << 20
    for r in (*held, tenant):
        r.release()
    assert adm.held() == 0 and main.stats().reserved_bytes == 0
    small = HealthAdmission(MemoryBudget(64 << 20), 1 << 20, strangers=True)
    assert small.budget_bytes == 8 << 20  # at most 1/8 of the budget
    assert HealthAdmission(MemoryBudget(0), 1 << 20, strangers=False).budget is None


def test_watch_streams_hold_no_window_once_their_request_is_in(tmp_path):
    """A host opens the 8 Watch streams it may hold (``health_service``'s per-host cap), tokenless, and keeps them.
    Each held its receive window in the health budget for its life, 8 windows, the host's whole share: the same host's
    prober then got RESOURCE_EXHAUSTED on every Check, and 4 such hosts held the whole budget (break25 F1: 158 of 158
    probes refused in 40 s). A Watch's client closes its side with its one request, so nothing more can come: its
    window is given back then, and the Checks are answered."""
    with _budget_server(tmp_path) as srv, grpc.insecure_channel(srv.address) as watch_ch, \
            grpc.insecure_channel(srv.address) as probe_ch:
        watch = health_pb2_grpc.HealthStub(watch_ch).Watch
        streams = []
        try:
            for _ in range(8):  # one after another: each answered (so its window given back) before the next opens
                streams.append(watch(health_pb2.HealthCheckRequest(), timeout=60))
                assert next(streams[-1]).status == SERVING
            _until(lambda: srv.runtime.health.held() == 0)
            codes = [_check(probe_ch) for _ in range(4)]
            assert codes == ["SERVING"] * 4, codes
        finally:
            for s in streams:
                s.cancel()


def test_a_watch_that_keeps_its_request_stream_open_is_ended(tmp_path, monkeypatch):
    """A raw client that sends a Watch's request and neither closes its side nor sends more is ended INVALID_ARGUMENT
    after ``HEALTH_FIRST_MESSAGE_S`` (it would keep its receive window for the stream's life); one that sends a second
    request at once, likewise. The server here waits 2 s, not the default 5 s (read when it is built and when a
    Watch waits)."""
    from edge_server import wire

    monkeypatch.setattr(wire, "HEALTH_FIRST_MESSAGE_S", 2.0)
    first_message_s = wire.HEALTH_FIRST_MESSAGE_S
    with _budget_server(tmp_path) as srv, grpc.insecure_channel(srv.address) as ch:
        raw = ch.stream_stream("/grpc.health.v1.Health/Watch",
                               request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
        stop = threading.Event()

        def open_side():
            yield health_pb2.HealthCheckRequest()
            stop.wait(first_message_s + 10)

        t0 = time.monotonic()
        call = raw(open_side(), timeout=first_message_s + 10)
        try:
            list(call)
            raise AssertionError("the Watch was answered without end")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        finally:
            stop.set()
        assert first_message_s - 0.5 < time.monotonic() - t0 < first_message_s + 5
        two = raw(iter([health_pb2.HealthCheckRequest(), health_pb2.HealthCheckRequest()]), timeout=10)
        try:
            list(two)
            raise AssertionError("a Watch with two requests was answered")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        _until(lambda: srv.runtime.health.held() == 0)


def _hold_silent_checks(srv, sources, per_host: int, stop: threading.Event, complete: bool = False) -> list[int]:
    """From each of ``sources`` (loopback addresses), keep ``per_host`` health Checks open that send HEADERS and
    nothing else (``complete``: HEADERS, then their request and the end of their side at once, as a grpc client
    does), opening a new one as soon as the server ends one, until ``stop``; returns the calls opened per host.
    Bounded: ``stop`` is set by the caller's ``finally``."""
    from tests.h2raw import H2Conn, grpc_message

    conns = [H2Conn("127.0.0.1", srv.port, source=s) for s in sources]
    opened = [0] * len(conns)

    def hold(i: int, conn) -> None:
        live: set[int] = set()
        while not stop.is_set() and not conn.closed:
            live -= conn.ended
            while len(live) < per_host and not stop.is_set():
                sid = conn.open("Check", service="/grpc.health.v1.Health/")
                if complete:
                    conn.send(sid, grpc_message(b""), end=True)
                live.add(sid)
                opened[i] += 1
            stop.wait(0.005)
        conn.close()

    threads = [threading.Thread(target=hold, args=(i, c), daemon=True) for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    stop.threads = threads  # type: ignore[attr-defined]
    return opened


def _probe(address: str, n: int, timeout: float = 1.0, every_s: float = 0.1) -> list[str]:
    """``n`` Checks from 127.0.0.1, each on a new channel (as a k8s probe: a connection per probe), ``every_s``
    apart; their answers (a status name or an error code)."""
    codes = []
    for _ in range(n):
        with grpc.insecure_channel(address) as ch:
            codes.append(_check(ch, timeout=timeout))
        time.sleep(every_s)
    return codes


@contextlib.contextmanager
def _silent_flood(port: int, sources, per_host: int, complete: bool = False):
    """:func:`_hold_silent_checks` against ``port`` for the block's length (yields the calls opened per host), its
    threads stopped and joined however the block ends."""
    stop = threading.Event()
    try:
        yield _hold_silent_checks(types.SimpleNamespace(port=port), sources, per_host, stop, complete)
    finally:
        stop.set()
        for t in getattr(stop, "threads", ()):
            t.join(10)


def test_silent_health_calls_from_five_hosts_give_their_windows_to_a_probe(tmp_path):
    """Five hosts (127.0.0.2-6) each keep six tokenless Checks open that never send their request, reopening each as
    soon as the server ends it: each host holds its share of the health budget (5 windows here), together the whole
    budget (21). Before (break25b F1): every probe from a sixth host was RESOURCE_EXHAUSTED for as long as they kept
    it up. Now a new call whose window does not fit takes the window of the oldest call of a host holding two
    windows more than its own (``edge_server.idle_windows``): the probes are answered."""
    with _budget_server(tmp_path) as srv, grpc.insecure_channel(srv.address) as probe_ch:
        budget = srv.runtime.health.budget_bytes
        stop = threading.Event()
        try:
            opened = _hold_silent_checks(srv, [f"127.0.0.{i}" for i in range(2, 7)], 6, stop)
            _until(lambda: srv.runtime.health.held() + srv.runtime.calls.window_bytes > budget)
            codes = []
            for _ in range(20):
                codes.append(_check(probe_ch, timeout=3))
                time.sleep(0.1)
            assert all(n >= 6 for n in opened), opened
        finally:
            stop.set()
            for t in getattr(stop, "threads", ()):
                t.join(10)
        assert codes.count("SERVING") >= 19, codes  # one may be taken back while it waits for a reading slot
        _until(lambda: srv.runtime.health.held() == 0)


def test_a_probe_takes_the_window_of_a_call_waiting_for_its_hosts_pacing_turn(tmp_path):
    """break26b F1: 24 hosts each keep one complete Check open (its request sent with its headers), reopened as soon
    as it is answered: past its burst each host's call waits ~0.1 s for its pacing turn holding its window, and
    together they hold the whole budget (21 windows here), no host two windows over a prober's none, none of their
    calls in a reading slot long. Before: such a call was never taken, and a probe from another host was
    RESOURCE_EXHAUSTED whenever the budget was full; now a call waiting for its pacing turn is taken first, at any age
    (``edge_server.idle_windows.idle_victim``), and ended UNAVAILABLE saying so."""
    with _budget_server(tmp_path) as srv, grpc.insecure_channel(srv.address) as probe_ch:
        budget, window = srv.runtime.health.budget_bytes, srv.runtime.calls.window_bytes
        with _silent_flood(srv.port, [f"127.0.3.{i}" for i in range(1, 25)], 1, complete=True) as opened:
            _until(lambda: srv.runtime.health.held() + window > budget)
            codes = []
            for _ in range(20):
                codes.append(_check(probe_ch, timeout=3))
                time.sleep(0.1)
            assert all(n >= 20 for n in opened), opened  # every host past its burst
        assert codes.count("SERVING") >= 18, codes
        _until(lambda: srv.runtime.health.held() == 0)


def test_held_open_watch_streams_from_the_probes_host_make_room_for_it(tmp_path):
    """The F1 repro (break25b): five Watch streams from the prober's own address send their request, keep their side
    open and are reopened as soon as the server ends them, holding that host's whole share (5 windows here). Before:
    74 of 74 Checks from the same address RESOURCE_EXHAUSTED. Now the probe takes the window of the host's oldest
    held stream, which is ended UNAVAILABLE."""
    with _budget_server(tmp_path) as srv, grpc.insecure_channel(srv.address) as ch, \
            grpc.insecure_channel(srv.address) as probe_ch:
        raw = ch.stream_stream("/grpc.health.v1.Health/Watch",
                               request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
        stop = threading.Event()
        ends: list[str] = []
        calls: list = []  # cancelled at the end: a Watch whose side is closed is answered until its deadline

        def holder() -> None:
            while not stop.is_set():
                def side():
                    yield health_pb2.HealthCheckRequest()
                    stop.wait(12)
                call = raw(side(), timeout=15)
                calls.append(call)
                if stop.is_set():
                    call.cancel()
                try:
                    list(call)
                except grpc.RpcError as e:
                    ends.append(e.code().name)

        threads = [threading.Thread(target=holder, daemon=True) for _ in range(5)]
        try:
            for t in threads:
                t.start()
            _until(lambda: srv.runtime.health.held() >= 5 * srv.runtime.calls.window_bytes)
            codes = []
            for _ in range(20):
                codes.append(_check(probe_ch, timeout=3))
                time.sleep(0.1)
        finally:
            stop.set()
            for call in list(calls):
                call.cancel()
            for t in threads:
                t.join(20)
        # nothing tells the probe's calls from the holders' on one host: a probe that finds them all in their reading
        # slot or half-close wait for less than IDLE_WINDOW_S (just reopened) is refused
        assert codes.count("SERVING") >= 16, codes
        assert "UNAVAILABLE" in ends, ends


def test_the_reading_slots_go_round_silent_hosts_fast_enough_for_a_1s_probe(tmp_path):
    """break26 F2: 20 hosts each keep one silent Check open (HEADERS, no request), reopened as it ends: the health
    gate's two reading slots go round them, a silent caller's slot taken back while another waits. At 0.25 s a
    turn 1 s probes timed out 13 of 20 (``DEADLINE_EXCEEDED``); a tokenless caller's turn is now 0.05 s
    (``wire.HEALTH_STRANGER_CONTENDED_S``; a tenant's stays 0.25 s) and every probe is answered."""
    with _budget_server(tmp_path) as srv:
        with _silent_flood(srv.port, [f"127.0.9.{i}" for i in range(1, 21)], 1) as opened:
            _until(lambda: sum(opened) >= 20)
            time.sleep(1.0)
            codes = _probe(srv.address, 10, timeout=1.0)  # each waits its turn of the round, ~0.4 s here
            assert sum(opened) >= 40, opened  # their silent calls were ended and reopened
        assert codes.count("SERVING") >= 9, codes


def test_without_tokens_silent_calls_at_the_health_cap_give_way_to_a_probe(tmp_path):
    """break26 Q4: without ``--auth-tokens`` 16 hosts x 16 silent Checks fill the health gate's 256 calls over all
    hosts (2 of 57 probes answered). Now a new call of a host holding fewer ends the oldest call of the host holding
    the most (``CallGate(take_calls=True)``) and the probes are answered."""
    from edge_server.testing import ServerThread
    from edge_server.wire import HEALTH_CALLS, HEALTH_CALLS_PER_HOST

    assert 16 * HEALTH_CALLS_PER_HOST >= HEALTH_CALLS
    with ServerThread(config=ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1)) as srv:
        with _silent_flood(srv.port, [f"127.0.10.{i}" for i in range(1, 17)], 16):
            time.sleep(2.0)
            codes = _probe(srv.address, 10, timeout=2.0)
        assert codes.count("SERVING") >= 9, codes
