"""Session 23: the idle rule of UploadWeights (progress = ``upload_progress_bytes`` of weights the tenant does not
hold already, or no weight half-received: ``uploads.ProgressClock``) on the data channel and on a Session stream's
in-stream weights. Before: the data channel's timeout was per read and every frame also refreshed the session, so
with a 4 MiB weight declared and 64 KiB sent, a held 1-byte weight re-sent every 0.3 s (or one byte of the frame's
payload every 0.3 s) kept the connection and its staging for ever; on the Session stream any message did. Real
servers on port 0, a raw data-channel client as ``/tmp/s23/dc_idle.py``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import socket
import threading
import time

import grpc

from edge_server.config import MiB
from edge_server.testing import ServerThread
from protos import datachannel as dc
from tests.test_data_channel import CONFIG, _connect
from tests.test_server_security import pki  # noqa: F401 - the module's throwaway CA (a fixture)
from tests.test_staging22 import _staging
from tests.waiting import wait_until
from ue_client import new_tenant, wire

TINY = b"\x07"
TSHA = hashlib.sha256(TINY).hexdigest()
BIG = hashlib.sha256(b"big23dc").hexdigest()


def _frame(sha: str, offset: int, size: int, total: int) -> bytes:
    return dc.encode_frame(sha, "uint8", (total,), offset, size, total)


class _Opened:
    """A raw Session stream (its messages from ``send``) and, if ``data``, its data connection."""

    def __init__(self, srv: ServerThread, data: bool = True, tls_ca: str | None = None,
                 tenant: str | None = None) -> None:
        self.tenant = tenant or new_tenant()
        self._q: list[bytes] = [wire.open_session(self.tenant, "m", None)]
        self._cv = threading.Condition()
        self._stop = False
        self.ch = wire.channel(srv.address, tls_ca=tls_ca)
        self.call = wire.session_call(wire.stub(self.ch), self._requests())
        self.events = iter(self.call)
        self.opened = wire.decode_event(next(self.events))
        self.session = srv.runtime.sessions.sessions[self.opened.session_id]
        self.sock: socket.socket | None = None
        if data and tls_ca is None:
            self.sock, answer = _connect(srv.runtime.data.port, self.opened.data_ticket, self.opened.session_id)
            assert answer == dc.ACCEPTED
        elif data:
            import ssl

            raw = socket.create_connection(("127.0.0.1", srv.runtime.data.port), timeout=10)
            self.sock = ssl.create_default_context(cafile=tls_ca).wrap_socket(raw, server_hostname="localhost")
            self.sock.sendall(dc.encode_hello(self.opened.data_ticket, self.opened.session_id))
            assert self.sock.recv(1) == dc.ACCEPTED

    def _requests(self):
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._q or self._stop)
                if not self._q:
                    return
                msg = self._q.pop(0)
            yield msg

    def send(self, msg: bytes) -> None:
        with self._cv:
            self._q.append(msg)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self.sock is not None:
            self.sock.close()
        self.call.cancel()
        self.ch.close()


def _server(**kw) -> ServerThread:
    return ServerThread(config=dataclasses.replace(CONFIG, **kw))


def _tick(send, seconds: float, ended, every: float = 0.3) -> float | None:
    """``send()`` every ``every`` s for ``seconds`` or until ``ended()``; when it ended or a send failed (the server
    closed), else None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            send()
        except OSError:
            break
        if ended():
            break
        time.sleep(every)
    else:
        return None
    with contextlib.suppress(AssertionError):  # it ended, or the caller's assert says how long it took
        wait_until(ended, 1.0)
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------------------
# the data channel


def test_resending_a_held_weight_does_not_keep_a_data_connections_half_received_weight():
    """Before: still open at 8 s, 64 KiB staged of 4 MiB declared, 0 failed. Now closed after ~1 s without 64 KiB
    of new weights (idle_closed), the staging given back, the session still open."""
    with _server(data_idle_s=1.0, session_idle_s=60.0) as srv:
        o = _Opened(srv)
        try:
            s, data = o.sock, srv.runtime.data
            s.sendall(_frame(TSHA, 0, 1, 1) + TINY)  # now held
            wait_until(lambda: data.counters.weights_committed == 1)
            s.sendall(_frame(BIG, 0, 64 << 10, 4 * MiB) + b"\x01" * (64 << 10))
            wait_until(lambda: _staging(srv, o.tenant) > 0)
            ended = _tick(lambda: s.sendall(_frame(TSHA, 0, 1, 1) + TINY), 6.0, lambda: data.counters.failed)
            assert ended is not None and ended < 4, ("the held weight kept it open", ended, data.counters)
            assert data.counters.failed == 1 and data.counters.idle_closed == 1, data.counters
            wait_until(lambda: _staging(srv) == 0 and _staging(srv, o.tenant) == 0)
            assert not o.session.closed  # the connection ended, not the session
        finally:
            o.close()


def test_a_byte_trickled_inside_a_frame_does_not_keep_a_data_connection():
    """Before: a frame declaring 1 MiB of a 4 MiB weight, 64 KiB sent, then a byte of it every 0.3 s: open at 6 s
    (the timeout was per read). Now closed within ~2 s."""
    with _server(data_idle_s=1.0, session_idle_s=60.0) as srv:
        o = _Opened(srv)
        try:
            s, data = o.sock, srv.runtime.data
            s.sendall(_frame(BIG, 0, 1 * MiB, 4 * MiB) + b"\x01" * (64 << 10))
            ended = _tick(lambda: s.sendall(b"\x01"), 6.0, lambda: data.counters.failed)
            assert ended is not None and ended < 4, ("the trickle kept it open", ended, data.counters)
            assert data.counters.failed == 1 and data.counters.idle_closed == 1, data.counters
            wait_until(lambda: _staging(srv) == 0)
        finally:
            o.close()


def test_a_tls_data_connection_stalled_mid_frame_is_shut_down_by_the_sweep(pki):  # noqa: F811 - the fixture
    """The frame loop's reads block (no per-read timeout since session 23): a TLS connection that stops 64 KiB into a
    1 MiB frame is ended by the acceptor's sweep through its TLS socket, its staging given back."""
    with _server(data_idle_s=1.0, session_idle_s=60.0, tls_cert_file=pki["server"],
                 tls_key_file=pki["server_key"]) as srv:
        o = _Opened(srv, tls_ca=pki["ca"])
        try:
            s, data = o.sock, srv.runtime.data
            s.sendall(_frame(BIG, 0, 1 * MiB, 4 * MiB) + b"\x01" * (64 << 10))
            t0 = time.monotonic()
            wait_until(lambda: data.counters.failed == 1, 6.0, what="the stalled TLS connection ended")
            assert time.monotonic() - t0 < 4 and data.counters.idle_closed == 1, data.counters
            wait_until(lambda: _staging(srv) == 0, what="its staging given back")
        finally:
            o.close()


def test_an_honest_slow_data_connection_is_not_cut_within_a_frame():
    """A UE at twice the bound (128 KiB/s against 64 KiB per 1 s) sending one 512 KiB frame over 4 s: its bytes
    are progress as they arrive (not at the frame's end), so it is never cut and the weight is committed."""
    raw = bytes(range(256)) * 2048
    sha = hashlib.sha256(raw).hexdigest()
    with _server(data_idle_s=1.0, session_idle_s=60.0, max_chunk_bytes=1 * MiB) as srv:
        o = _Opened(srv)
        try:
            s, data = o.sock, srv.runtime.data
            s.sendall(_frame(sha, 0, len(raw), len(raw)))
            for i in range(0, len(raw), 16 << 10):
                s.sendall(raw[i : i + (16 << 10)])
                time.sleep(0.125)
            wait_until(lambda: data.counters.weights_committed == 1, what="the slow weight committed")
            assert data.counters.failed == 0 and data.counters.idle_closed == 0
        finally:
            o.close()


def test_re_sending_a_weight_the_tenant_came_to_hold_is_not_cut_as_idle():
    """Session 23's tester: UE b re-sends, at twice the bound, a weight UE a of its tenant committed first. Its
    bytes are not progress (nothing new) and its upload was counted half-received, so b's connection was cut after
    1 s (idle_closed) while bytes flowed, though it held no staging. Now a re-sent held weight is not bounded: b's
    upload completes, nothing is cut. (512 KiB: 4 s at that rate, four idle windows.)"""
    raw = bytes(range(256)) * 2048
    sha = hashlib.sha256(raw).hexdigest()
    with _server(data_idle_s=1.0, session_idle_s=60.0, max_chunk_bytes=2 * MiB) as srv:
        a = _Opened(srv)
        b = _Opened(srv, tenant=a.tenant)
        try:
            data = srv.runtime.data
            a.sock.sendall(_frame(sha, 0, len(raw), len(raw)) + raw)
            wait_until(lambda: srv.runtime.store.has(a.tenant, sha), what="a's weight stored")
            b.sock.sendall(_frame(sha, 0, len(raw), len(raw)))
            for i in range(0, len(raw), 16 << 10):  # 128 KiB/s: 4 s for 512 KiB, past the 1 s idle window
                b.sock.sendall(raw[i : i + (16 << 10)])
                time.sleep(0.125)
            wait_until(lambda: data.counters.weights_committed == 2, what="b's re-sent weight ended")
            assert data.counters.failed == 0 and data.counters.idle_closed == 0, data.counters
        finally:
            a.close()
            b.close()


def test_data_progress_bytes_is_range_checked():
    import pytest

    from edge_server.config import ServerConfig

    for bad in (0, -1, 0.5):
        with pytest.raises(ValueError, match="data_progress_bytes"):
            ServerConfig(data_progress_bytes=bad)


# ------------------------------------------------------------------------------------------------------
# the Session stream's in-stream weights


def _weight(sha: str, offset: int, data: bytes, total: int) -> bytes:
    return wire.encode_weight_chunk(sha, "uint8", (total,), offset, total, data)


def test_resending_a_held_weight_does_not_keep_a_session_streams_half_received_weight():
    """Before: any Session message restarted its idle clock, so with 64 KiB of a 4 MiB weight sent in-stream, a
    held 1-byte weight re-sent every 0.3 s kept the session and its staging (open at 6 s). Now the session ends
    DEADLINE_EXCEEDED within ~2 s (session_idle_s 1, upload_progress_bytes 64 KiB) and its staging is free."""
    with _server(session_idle_s=1.0, upload_progress_bytes=64 << 10, data_port=None) as srv:
        o = _Opened(srv, data=False)
        try:
            o.send(_weight(TSHA, 0, TINY, 1))
            o.send(_weight(BIG, 0, b"\x01" * (64 << 10), 4 * MiB))
            wait_until(lambda: _staging(srv, o.tenant) > 0)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 6 and not o.session.closed:
                o.send(_weight(TSHA, 0, TINY, 1))
                time.sleep(0.3)
            assert o.session.closed, "the held weight kept the session open"
            assert time.monotonic() - t0 < 4
            code = None
            with contextlib.suppress(StopIteration):
                try:
                    for _ in o.events:
                        pass
                except grpc.RpcError as e:
                    code = e.code()
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(lambda: _staging(srv) == 0 and _staging(srv, o.tenant) == 0)
        finally:
            o.close()


def test_an_honest_slow_in_stream_upload_keeps_its_session():
    """128 KiB/s in 16 KiB chunks against 64 KiB per 1 s: the session lives and the 512 KiB weight is stored."""
    raw = bytes(range(256)) * 2048
    sha = hashlib.sha256(raw).hexdigest()
    with _server(session_idle_s=1.0, upload_progress_bytes=64 << 10, data_port=None) as srv:
        o = _Opened(srv, data=False)
        try:
            for i in range(0, len(raw), 16 << 10):
                o.send(_weight(sha, i, raw[i : i + (16 << 10)], len(raw)))
                time.sleep(0.125)
            wait_until(lambda: srv.runtime.store.has(o.tenant, sha) or o.session.closed)
            assert not o.session.closed
        finally:
            o.close()
