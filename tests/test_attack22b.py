"""review22b's findings 1-2 (``/tmp/rv22bp``: p7_health_flood, p9_tenant_starve): a slot taken back from a key went
straight back to the same key's next queued call (the oldest waiter among the keys holding fewest, and the key that
just lost its slot holds none), so silent callers kept the slots whatever the take-back did. A stranger without a
token at two loopback hosts holding 16 silent health Check calls each failed a 1 s prober 8 of 9 times (the health
gate's slots also waited 2 s before a take-back); two tenants holding 8 silent Hello calls each starved a third's
Stats calls (0-1 of 4 answered in 6 s). Now among waiters whose keys hold equally few the key served least recently
goes first, and the health gate takes a silent call's slot back after 0.25 s. Real servers on port 0; raw HTTP/2
clients (``tests/h2raw.py``) hold the silent calls, reopening each as the server ends it."""

from __future__ import annotations

import threading
import time

import grpc

from edge_server.config import MiB
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.h2raw import H2Conn
from tests.test_attack21 import _md, _server


class _Holders:
    """Threads that each keep ``per`` silent calls of ``method`` open on one connection until :meth:`stop`."""

    def __init__(self, port: int, conns: list[dict], method: str, per: int, **open_kw) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._hold, args=(port, c, method, per, open_kw), daemon=True)
                         for c in conns]
        for t in self._threads:
            t.start()

    def _hold(self, port, conn_kw, method, per, open_kw) -> None:
        md = conn_kw.pop("metadata", ())
        conn = H2Conn("127.0.0.1", port, **conn_kw)
        try:
            live = [conn.open(method, md, **open_kw) for _ in range(per)]
            while not self._stop.wait(0.1) and not conn.closed:
                for i, s in enumerate(live):
                    if s in conn.ended:
                        live[i] = conn.open(method, md, **open_kw)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def test_silent_health_calls_from_two_hosts_leave_the_prober_answered(tmp_path):
    """Before: 1 of 9 probes SERVING (1 s timeout), the rest DEADLINE_EXCEEDED."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _server(tmp_path) as srv:
        hold = _Holders(srv.port, [{"source": "127.0.0.10"}, {"source": "127.0.0.11"}], "Check", 16,
                        service="/grpc.health.v1.Health/")
        try:
            time.sleep(1.0)
            codes = []
            with grpc.insecure_channel(srv.address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                for _ in range(6):
                    t0 = time.monotonic()
                    try:
                        r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                        codes.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
                    except grpc.RpcError as e:
                        codes.append(e.code().name)
                    time.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))
            assert codes.count("SERVING") >= 5, codes
        finally:
            hold.stop()


def test_two_tenants_holding_silent_calls_do_not_starve_a_third(tmp_path):
    """Two reading slots; alice and bob keep 8 silent Hello calls each (within their limits). Before: carol's Stats
    calls (6 s deadline) answered 0-1 of 4; the slot taken back after the contended time went to the same tenant's
    next silent call. Taken back after 1 s (contended time and reading grace; the grace's default, 5 s, made each
    Stats wait 5 s)."""
    with _server(tmp_path, max_reading_bytes=16 * MiB, contended_first_message_s=1.0, reading_grace_s=1.0) as srv:
        hold = _Holders(srv.port, [{"metadata": _md("alice")}, {"metadata": _md("bob")}], "Hello", 8)
        try:
            time.sleep(1.5)
            codes, waits = [], []
            with grpc.insecure_channel(srv.address) as ch:
                stub = pbg.EdgeServiceStub(ch)
                for _ in range(4):
                    t0 = time.monotonic()
                    try:
                        stub.Stats(pb.StatsRequest(), metadata=_md("carol"), timeout=6.0)
                        codes.append("OK")
                    except grpc.RpcError as e:
                        codes.append(e.code().name)
                    waits.append(round(time.monotonic() - t0, 2))
            assert codes == ["OK"] * 4, (codes, waits)
        finally:
            hold.stop()
