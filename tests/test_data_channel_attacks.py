"""The data channel (issue 12) attacked from outside, as a stranger with raw sockets and the project's
byte format, against real edge servers on loopback port 0 (issue 11's standard): a hello trickled one
byte at a time (slowloris) is cut at the hello deadline, not at each byte's timeout; strangers that fill
the connection cap (from one address or many) make room for a UE's connection; absurd frame headers
(overflowing shapes, 2**64-1 offsets and totals) close the connection with a client error, never a
crash; a session closed while its bytes flow leaves no staging, pins or weight behind; another
tenant's weight changes nothing that a tenant sees on the data channel (presence does not leak). Every
test is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
import select
import socket
import threading
import time

import pytest

from edge_server.testing import ServerThread
from protos import datachannel as dc
from tests.test_data_channel import CONFIG, _blob, _connect, _held, _session, _stats, _wait, offload_client
from tests.test_server_security import pki  # noqa: F401 - the module's throwaway CA (a fixture)
from ue_client import new_tenant, wire
from ue_client import session as S

HELLO_S = 1.0
"""The hello deadline of this module's servers (the default is 5 s)."""


@pytest.fixture(scope="module")
def server_options():
    return {"config": dataclasses.replace(CONFIG, data_max_connections=4)}


@pytest.fixture
def short_hello(server):
    """The module's server with a hello deadline of :data:`HELLO_S` for one test."""
    data = server.runtime.data
    old, data.hello_timeout_s = data.hello_timeout_s, HELLO_S
    try:
        yield server
    finally:
        data.hello_timeout_s = old


def _closed_by_peer(s: socket.socket) -> bool:
    """True once the server has closed ``s`` (EOF or reset readable now)."""
    import ssl

    if not select.select([s], [], [], 0)[0]:
        return False
    timeout = s.gettimeout()
    s.settimeout(0)  # TLS: what is readable may be only a session ticket, no application byte
    try:
        return s.recv(1) in (b"", dc.REFUSED)
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:
        return True
    finally:
        s.settimeout(timeout)


def _try_connect(port: int, ticket: bytes, session_id: str) -> bytes:
    """The server's one-byte answer to a hello (b"" when it closed or reset the connection instead)."""
    try:
        s, answer = _connect(port, ticket, session_id)
    except OSError:
        return b""
    s.close()
    return answer


def _no_crash(caplog) -> None:
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("edge_server")]
    assert not crashes, [r.getMessage() for r in crashes]


# ------------------------------------------------------------------------------------------------------
# before the ticket: strangers


def test_a_trickled_hello_is_cut_at_the_hello_deadline(short_hello):
    """Slowloris: one byte of a hello every 0.2 s. Each byte comes well within a per-read timeout, so a
    per-read timeout alone would hold the connection (and one of the capped slots) for as long as the
    stranger likes; the deadline of the whole hello closes it after ~HELLO_S."""
    srv = short_hello
    hello = dc.encode_hello(secrets.token_bytes(dc.TICKET_BYTES), "x" * dc.MAX_SESSION_ID)
    s = socket.create_connection(("127.0.0.1", srv.runtime.data.port), timeout=10)
    with s:
        sent = 0
        closed = False
        for b in hello[:40]:  # 40 bytes: 8 s of trickle, 8x the deadline
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            sent += 1
            time.sleep(0.2)
            if _closed_by_peer(s):
                closed = True
                break
        assert closed, f"the server still read a hello after {sent} bytes in {sent * 0.2:.1f} s"
        assert sent < 20
    _wait(lambda: srv.runtime.data.open_connections == 0, what="the slot given back")


def test_strangers_over_a_full_cap_make_room_and_admitted_connections_do_not(server):
    """The cap (4 here) full of silent strangers: a UE's connection closes the oldest of them and is
    admitted at once (before, it was refused until the strangers' hello deadline, and strangers that
    reconnected held the cap for good); the other strangers are still cut at their deadline. A cap full
    of *admitted* connections (each with its ticket) is never made room in: the next UE is refused."""
    data = server.runtime.data
    old = data.hello_timeout_s
    data.hello_timeout_s = 2 * HELLO_S
    held: list[tuple] = []
    strangers: list[socket.socket] = []
    try:
        _wait(lambda: data.open_connections == 0, what="the slots of earlier tests back")
        evicted0 = data.counters.evicted
        strangers = [socket.create_connection(("127.0.0.1", data.port), timeout=10) for _ in range(4)]
        _wait(lambda: data.open_connections == 4, what="the strangers admitted to their hello")
        ch, sess = _session(server, new_tenant())
        held.append((ch, sess))
        s, answer = _connect(data.port, sess.opened.data_ticket, sess.opened.session_id)
        held.append((s,))
        assert answer == dc.ACCEPTED
        assert data.counters.evicted == evicted0 + 1
        _wait(lambda: _closed_by_peer(strangers[0]), timeout_s=10, what="the oldest stranger closed")
        _wait(lambda: data.open_connections == 1, timeout_s=10 * data.hello_timeout_s, what="the others cut")
        for _ in range(3):  # the cap full of admitted connections
            ch, sess = _session(server, new_tenant())
            held.append((ch, sess))
            s, answer = _connect(data.port, sess.opened.data_ticket, sess.opened.session_id)
            held.append((s,))
            assert answer == dc.ACCEPTED
        ch, sess = _session(server, new_tenant())
        held.append((ch, sess))
        assert _try_connect(data.port, sess.opened.data_ticket, sess.opened.session_id) in (b"", dc.REFUSED)
        assert data.counters.evicted == evicted0 + 1
        assert data.open_connections == 4
    finally:
        data.hello_timeout_s = old
        for x in strangers:
            x.close()
        for h in reversed(held):
            if len(h) == 1:
                h[0].close()
            else:
                h[1].close()
                h[0].close()
    _wait(lambda: data.open_connections == 0, what="every slot given back")


def test_one_address_without_tickets_cannot_fill_the_connection_cap(server):
    """A stranger at 127.0.0.1 opens as many connections as the cap (4 here) and says nothing: past 2
    (its per-address limit here) it is refused at once, so a UE at 127.0.0.2 still gets a slot (on the
    code before, the stranger held all 4 until the hello deadline, and could reconnect at once)."""
    data = server.runtime.data
    old, data.max_pending_per_peer = getattr(data, "max_pending_per_peer", None), 2
    ch, sess = _session(server, new_tenant())
    strangers: list[socket.socket] = []
    try:
        refused0 = data.counters.refused
        strangers = [socket.create_connection(("127.0.0.1", data.port), timeout=10) for _ in range(4)]
        _wait(lambda: data.counters.refused == refused0 + 2, what="the stranger's 3rd and 4th refused")
        assert data.open_connections == 2
        s = socket.create_connection(("127.0.0.1", data.port), timeout=10, source_address=("127.0.0.2", 0))
        with s:
            s.sendall(dc.encode_hello(sess.opened.data_ticket, sess.opened.session_id))
            assert s.recv(1) == dc.ACCEPTED
        assert sess.alive
    finally:
        data.max_pending_per_peer = old
        for x in strangers:
            x.close()
        sess.close()
        ch.close()
    _wait(lambda: data.open_connections == 0 and not data._pending, what="every slot given back")


def test_strangers_at_many_addresses_cannot_keep_a_ue_off_the_data_channel(server):
    """Loopback has 127.0.0.0/8: strangers at two addresses (2 each, the per-address limit here) fill the
    cap (4 here) and say nothing; reconnecting as each is cut at the hello deadline they held it for as
    long as they liked, and every UE's data connection was refused (on the code before: refused here, the
    test's 30 s hello deadline far off). A new connection over a full cap now closes the oldest connection
    still without a ticket, so the UE, whose hello follows its connect at once, is admitted."""
    data = server.runtime.data
    old = data.max_pending_per_peer, data.hello_timeout_s
    data.max_pending_per_peer, data.hello_timeout_s = 2, 30.0
    ch, sess = _session(server, new_tenant())
    strangers: list[socket.socket] = []
    try:
        _wait(lambda: data.open_connections == 0, what="the slots of earlier tests back")
        for host in ("127.0.0.2", "127.0.0.3"):
            for _ in range(2):
                strangers.append(
                    socket.create_connection(("127.0.0.1", data.port), timeout=10, source_address=(host, 0))
                )
                n = len(strangers)
                _wait(lambda n=n: data.open_connections == n, what="the stranger admitted to its hello")
        t0 = time.monotonic()
        answer = _try_connect(data.port, sess.opened.data_ticket, sess.opened.session_id)
        assert answer == dc.ACCEPTED, f"refused ({answer!r}) {time.monotonic() - t0:.2f} s into a 30 s hello deadline"
        _wait(lambda: _closed_by_peer(strangers[0]), timeout_s=10, what="the oldest stranger closed")
        assert not any(_closed_by_peer(x) for x in strangers[1:])  # only the one the UE's slot needed
        assert sess.alive
    finally:
        data.max_pending_per_peer, data.hello_timeout_s = old
        for x in strangers:
            x.close()
        sess.close()
        ch.close()
    _wait(lambda: data.open_connections == 0 and not data._pending, what="every slot given back")


def test_tls_to_a_plain_data_port_is_refused_and_the_server_goes_on(server, caplog):
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", server.runtime.data.port), timeout=10)
    with raw, pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(raw).do_handshake()
    _wait(lambda: server.runtime.data.open_connections == 0, what="the connection closed")
    ch, sess = _session(server, new_tenant())
    try:
        s, answer = _connect(server.runtime.data.port, sess.opened.data_ticket, sess.opened.session_id)
        s.close()
        assert answer == dc.ACCEPTED
    finally:
        sess.close()
        ch.close()
    _no_crash(caplog)


# ------------------------------------------------------------------------------------------------------
# after the ticket: absurd headers

U64 = (1 << 64) - 1
SHA = b"\x11" * 32


def _frame(dtype: bytes, shape: tuple[int, ...], offset: int, size: int, total: int) -> bytes:
    dims = tuple(shape) + (0,) * (dc.MAX_NDIM - len(shape))
    return dc.FRAME.pack(dc.MAGIC_FRAME, SHA, dtype, len(shape), offset, size, total, *dims)


@pytest.mark.parametrize(
    "frame",
    [
        _frame(b"uint8", (1 << 63, 1 << 63), 0, 4, 0),  # a shape whose product overflows 64 bits (to 0)
        _frame(b"float64", (1 << 32,) * 4, 0, 4, 0),  # 2**128 elements
        _frame(b"uint8", (U64,), 0, 4, U64),  # total 2**64-1, as the shape says
        _frame(b"uint8", (8,), U64, 1, 8),  # offset 2**64-1 (offset + size overflows 64 bits)
        _frame(b"uint8", (8,), 0, U64, 8),  # size 2**64-1
        _frame(b"uint8", (0,), 0, 0, 0),  # an empty weight whose sha256 is not that of b""
        _frame(b"uint8", (), 0, 1, 1),  # a scalar uint8 with the wrong hash follows
        _frame(b"bool", (4,), 0, 4, 4),  # bools of byte value 7 follow
        _frame(b"", (4,), 0, 4, 4),  # no dtype
        _frame(b"float32", (1 << 62,), 0, 4, 1 << 64 - 1),  # total_bytes of a different (wrapped) size
    ],
)
def test_absurd_frame_headers_are_client_errors(server, frame, caplog):
    caplog.set_level(logging.WARNING)
    ch, sess = _session(server, new_tenant())
    try:
        s, answer = _connect(server.runtime.data.port, sess.opened.data_ticket, sess.opened.session_id)
        assert answer == dc.ACCEPTED
        failed0 = server.runtime.data.counters.failed
        with s:
            s.sendall(frame)
            with contextlib.suppress(OSError):
                s.sendall(b"\x07" * 4)
            with contextlib.suppress(ConnectionResetError):  # a reset: the server closed with bytes unread
                assert s.recv(1) == b""
        _wait(lambda: server.runtime.data.counters.failed == failed0 + 1, what="the connection counted failed")
        assert _stats(server).store.staging_bytes == 0 and sess.alive
    finally:
        sess.close()
        ch.close()
    _no_crash(caplog)


# ------------------------------------------------------------------------------------------------------
# the session ends while its bytes flow


def test_session_closed_while_bytes_flow_leaves_nothing(server):
    tenant = new_tenant()
    raw, sha = _blob(3 * (1 << 20) // 2, 31)
    ch, sess = _session(server, tenant)
    try:
        s, answer = _connect(server.runtime.data.port, sess.opened.data_ticket, sess.opened.session_id)
        assert answer == dc.ACCEPTED
        with s:
            s.sendall(dc.encode_frame(sha, "uint8", (len(raw),), 0, 1 << 20, len(raw)) + raw[: 512 << 10])
            _wait(lambda: server.runtime.store.stats(tenant).staging_bytes == len(raw), what="staging charged")
            sid = sess.opened.session_id
            sess.close()
            _wait(lambda: sid not in server.runtime.sessions.sessions, what="the session closed")
            s.settimeout(10)
            end = time.monotonic() + 10
            with contextlib.suppress(OSError):  # the rest of the bytes find the connection shut
                while time.monotonic() < end and s.send(raw[512 << 10 : 1 << 20]):
                    pass
        _wait(lambda: _stats(server).store.staging_bytes == 0, what="staging freed")
        st = _stats(server).store
        assert st.pinned_bytes == 0 and not _held(server, tenant, sha)
    finally:
        sess.close()
        ch.close()


# ------------------------------------------------------------------------------------------------------
# tenants


def test_another_tenants_weight_does_not_show_on_the_data_channel(tmp_path):
    """Tenant A holds a weight. Tenant B's data-channel upload of the same sha256 is charged its whole
    staging (no skip), a wrong size for it is just B's own mismatch with nothing held, and B ends up
    holding it only after sending every byte; A's copy is untouched."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tenants": {"a": {"token": "token-a-000001"}, "b": {"token": "token-b-000001"}}}))
    cfg = dataclasses.replace(CONFIG, auth_tokens_file=str(tokens))
    raw, sha = _blob(1 << 20, 41)
    with ServerThread(config=cfg) as srv:
        store = srv.runtime.store
        store.put("a", raw, sha256=sha)
        ch = wire.channel(srv.address, token="token-b-000001")
        sess = S.SessionStream(wire.stub(ch), "", "m")
        try:
            # a size that differs from A's copy: for B nothing is held, so the upload starts (and waits)
            s, answer = _connect(srv.runtime.data.port, sess.opened.data_ticket, sess.opened.session_id)
            assert answer == dc.ACCEPTED
            with s:
                s.sendall(dc.encode_frame(sha, "uint8", (len(raw) + 1,), 0, 1, len(raw) + 1))
                _wait(lambda: store.stats("b").staging_bytes == len(raw) + 1, what="B's staging charged in full")
            _wait(lambda: store.staging.used == 0 and store.stats("b").staging_bytes == 0, what="B's staging freed")
            sess.close()
            ch.close()
            ch = wire.channel(srv.address, token="token-b-000001")
            sess = S.SessionStream(wire.stub(ch), "", "m")
            s, answer = _connect(srv.runtime.data.port, sess.opened.data_ticket, sess.opened.session_id)
            assert answer == dc.ACCEPTED
            with s:
                s.sendall(dc.encode_frame(sha, "uint8", (len(raw),), 0, len(raw) // 2, len(raw)) + raw[: len(raw) // 2])
                _wait(lambda: store.stats("b").staging_bytes == len(raw), what="B charged (not A)")
                assert store.held_nbytes("b", sha) is None
                s.sendall(dc.encode_frame(sha, "uint8", (len(raw),), len(raw) // 2, len(raw) // 2, len(raw)))
                s.sendall(raw[len(raw) // 2 :])
                _wait(lambda: sha in sess.held, what="B's weight committed")
            assert store.held_nbytes("a", sha) == len(raw) and store.held_nbytes("b", sha) == len(raw)
        finally:
            sess.close()
            ch.close()


def _trickle(s: socket.socket, data: bytes, n: int, every_s: float = 0.2) -> int:
    """Send the first ``n`` bytes of ``data`` one at a time; the count sent before the server closed."""
    for i, b in enumerate(data[:n]):
        try:
            s.sendall(bytes([b]))
        except OSError:
            return i
        time.sleep(every_s)
        if _closed_by_peer(s):
            return i + 1
    return n


def test_a_trickled_tls_handshake_or_hello_is_cut_at_the_deadline(pki):  # noqa: F811 - the fixture
    """TLS data port: a ClientHello trickled a byte per 0.2 s, and a hello trickled after a complete
    handshake, each closed at the one hello deadline (1 s here), not after 40 bytes (8 s)."""
    import ssl

    cfg = dataclasses.replace(CONFIG, tls_cert_file=pki["server"], tls_key_file=pki["server_key"])
    with ServerThread(config=cfg) as srv:
        data = srv.runtime.data
        data.hello_timeout_s = HELLO_S
        client = ssl.create_default_context(cafile=pki["ca"])
        obj = client.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        client_hello = out.read()
        with socket.create_connection(("127.0.0.1", data.port), timeout=10) as s:
            assert _trickle(s, client_hello, 40) < 20
        hello = dc.encode_hello(secrets.token_bytes(dc.TICKET_BYTES), "x" * dc.MAX_SESSION_ID)
        raw = socket.create_connection(("127.0.0.1", data.port), timeout=10)
        with client.wrap_socket(raw, server_hostname="localhost") as t:
            assert _trickle(t, hello, 40) < 20
        _wait(lambda: data.open_connections == 0, what="the slots given back")


# ------------------------------------------------------------------------------------------------------
# a busy process: descriptors above FD_SETSIZE


def test_the_data_channel_works_with_descriptors_above_fd_setsize(caplog):
    """A server process with over 1024 descriptors open (many clients; this host's limit is far above
    1024): a whole split run over the data channel, every weight on it, no crash logged. On the code
    with select.select() the request hung until the session's idle timeout (300 s by default; 3 s on
    this test's server): the server dropped the connection after a commit, the UE's sender died
    without resending in-stream."""
    import os
    import resource

    import torch

    from tests.test_data_channel import Net
    from ue_client.verify import max_abs_diff

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        if hard != resource.RLIM_INFINITY and hard < 2048:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2048")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        torch.manual_seed(0)
        net = Net().eval()
        x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
        with (
            ServerThread(config=dataclasses.replace(CONFIG, session_idle_s=3.0)) as server,
            offload_client(net, x, server.address, probe=False) as c,
        ):
            data = server.runtime.data
            y = c(x)
            with torch.no_grad():
                assert max_abs_diff(y, net(x)) <= 1e-5
            sess = c.engine.conn.session
            assert sess.data_sender is not None and sess.data_sender.active, sess.data_sender.error
            assert data.counters.weights_committed == len(c.engine.weight_acks) > 0
    finally:
        for fd in fillers:
            os.close(fd)
        if soft < 2048:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    _no_crash(caplog)


def test_one_weight_in_stream_and_on_the_data_channel_at_once(server):
    """A session sends the same weight both ways at once (the data channel's half first, then the whole
    weight in-stream, then the data channel's second half): it is stored once, acknowledged, pinned for
    the session, and once the session ends nothing stays pinned or staged."""
    tenant = new_tenant()
    raw, sha = _blob(1 << 20, 51)
    half = len(raw) // 2
    ch, sess = _session(server, tenant)
    try:
        s, answer = _connect(server.runtime.data.port, sess.opened.data_ticket, sess.opened.session_id)
        assert answer == dc.ACCEPTED
        with s:
            s.sendall(dc.encode_frame(sha, "uint8", (len(raw),), 0, half, len(raw)) + raw[:half])
            _wait(lambda: server.runtime.store.stats(tenant).staging_bytes == len(raw), what="staging charged")
            sess.queue.put(S.UplinkItem("weight", sha, "uint8", (len(raw),), memoryview(raw), (S.FOREGROUND, 0, 0)))
            _wait(lambda: sha in sess.held, what="the in-stream upload")
            s.sendall(dc.encode_frame(sha, "uint8", (len(raw),), half, half, len(raw)) + raw[half:])
            _wait(lambda: _stats(server).store.staging_bytes == 0, what="the second copy's staging freed")
            st = _stats(server).store
            assert st.pinned_bytes == len(raw) and _held(server, tenant, sha)
    finally:
        sid = sess.opened.session_id
        sess.close()
        ch.close()
    _wait(lambda: sid not in server.runtime.sessions.sessions, what="the session closed")
    _wait(lambda: _stats(server).store.pinned_bytes == 0, what="nothing pinned")
    assert _stats(server).store.staging_bytes == 0 and _held(server, tenant, sha)


def test_strangers_cost_the_operator_one_info_line_each(server, caplog):
    """20 strangers (a forged ticket, an HTTP request, TLS to the plain port): refused, one INFO line
    each and no WARNING (each used to be a WARNING: a stranger reconnecting in a loop wrote ~180 of them
    a second)."""
    import ssl

    caplog.set_level(logging.INFO, logger="edge_server.data_channel")
    port = server.runtime.data.port
    refused0 = server.runtime.data.counters.refused
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    for i in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s, contextlib.suppress(OSError):
            if i % 3 == 0:
                s.sendall(dc.encode_hello(secrets.token_bytes(dc.TICKET_BYTES), "x" * 32))
            elif i % 3 == 1:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40))
            else:
                client.wrap_socket(s).do_handshake()
            s.recv(1)
    _wait(lambda: server.runtime.data.counters.refused == refused0 + 20, what="20 refusals")
    _wait(lambda: server.runtime.data.open_connections == 0, what="the connections closed")
    mine = [r for r in caplog.records if r.name == "edge_server.data_channel"]
    assert [r for r in mine if r.levelno >= logging.WARNING] == []
    assert sum(r.levelno == logging.INFO for r in mine) == 20


# ------------------------------------------------------------------------------------------------------
# a UE that sends and never reads


@pytest.mark.slow  # ~20 s: grpc's buffers take ~100 000 acknowledgements before any waits unsent
def test_acknowledgements_a_ue_never_reads_stop_its_data_connection(server):
    """One tiny weight resent 400 000 times (209 bytes a frame, each an acknowledgement) on a session
    whose stream is never read: the server stops reading at the acknowledgement bound and closes the
    connection after its idle timeout, instead of holding an acknowledgement per frame (issue 12)."""
    from edge_server.data_channel import MAX_ACKS_WAITING

    data = server.runtime.data
    old, data.idle_timeout_s = data.idle_timeout_s, 1.0
    stop = threading.Event()

    def requests():
        yield wire.open_session(new_tenant(), "m", None)
        stop.wait(60)

    ch = wire.channel(server.address)
    call = wire.session_call(wire.stub(ch), requests())
    try:
        opened = wire.decode_event(next(iter(call)))
        failed0 = data.counters.failed
        s, answer = _connect(data.port, opened.data_ticket, opened.session_id)
        assert answer == dc.ACCEPTED
        raw = b"\x05"
        frame = dc.encode_frame(hashlib.sha256(raw).hexdigest(), "uint8", (1,), 0, 1, 1) + raw
        with s:
            with contextlib.suppress(OSError):  # the server stops reading, then closes
                for _ in range(400):
                    s.sendall(frame * 1000)
            _wait(lambda: data.counters.failed == failed0 + 1, what="the connection closed")
        session = server.runtime.sessions.sessions[opened.session_id]
        assert session.acks_waiting <= MAX_ACKS_WAITING + 32
        assert data.counters.weights_committed < 400_000
    finally:
        data.idle_timeout_s = old
        stop.set()
        call.cancel()
        ch.close()
