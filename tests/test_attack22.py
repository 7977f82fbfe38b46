"""Session 22's attacker (server22): what a call holds in grpc's buffers past its first message. A read past a stream's
first message lets grpc take in the whole message its prefix declares (up to the message limit) before anything
reaches Python, and a call whose handler is not reading still lets its client fill the receive window: both were
outside the memory budget. Real servers on port 0; a raw HTTP/2 client (``tests/h2raw.py``) sends messages in part,
grpc's own client checks the answers. Each test failed before its fix (said in each docstring)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

from edge_server.config import MiB
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.h2raw import H2Conn, grpc_message
from tests.test_attack21 import _md, _server, _Silent, _until

DECLARED = 8 * MiB - 64
"""A message just under the server's 8 MiB limit (a declared length over it is refused by grpc at the prefix)."""
SLACK = 64 << 10
"""What grpc may let an unread call send beyond its window (seen: one 16 KiB frame more, under load)."""


def _partial_upload(conn: H2Conn, who: str) -> tuple[int, int]:
    """An UploadWeights call: its header, then all but the last byte of a DECLARED-byte chunk message; returns the
    stream and the bytes the server took in."""
    sid = conn.open("UploadWeights", _md(who))
    conn.send(sid, grpc_message(pb.UploadWeightsRequest(header=pb.UploadHeader()).SerializeToString()))
    return sid, conn.fill(sid, grpc_message(b"", declared=DECLARED) + b"\x0a" * (DECLARED - 1), settle_s=1.0)


def _quiet(srv) -> None:
    """Nothing reserved and no call open (within 5 s of the clients' end)."""
    _until(lambda: srv.runtime.calls.open_calls() == 0 and srv.runtime.memory.stats().reserved_bytes == 0)


def test_a_streams_message_sent_in_part_past_its_first_is_held_in_the_memory_budget(tmp_path):
    """Before: each of alice's UploadWeights calls had the server take in 8 MiB of a chunk message left unfinished,
    with nothing reserved (16 such calls: 128 MiB, RSS +144 MiB; a tenant may hold 256 calls), and a fifth call
    was let in like the others. Now each stream past its first message holds the message limit and its window in
    the budget for its life: alice's share (40 MiB here) takes four, the fifth is refused RESOURCE_EXHAUSTED naming
    the next message, bob is still served, and nothing stays reserved after."""
    with _server(tmp_path, max_reading_bytes=16 * MiB) as srv:
        gate, mem = srv.runtime.calls, srv.runtime.memory
        mem.limit_bytes = 80 * MiB  # one tenant may hold 40 MiB
        per_stream = gate.window_bytes + srv.runtime.config.max_message_bytes  # the message limit: 8 MiB
        conn = H2Conn("127.0.0.1", srv.port)
        try:
            taken = 0
            for i in range(4):
                sid, n = _partial_upload(conn, "alice")
                assert n > DECLARED - (64 << 10), n  # the server let the client send (almost) all of it
                taken += n
                assert sid not in conn.ended
                assert mem.held_by("alice") == (i + 1) * per_stream >= taken
            with grpc.insecure_channel(srv.address) as ch:
                stub = pbg.EdgeServiceStub(ch)
                header = pb.UploadWeightsRequest(header=pb.UploadHeader())
                try:
                    stub.UploadWeights(iter([header]), metadata=_md("alice"), timeout=10)
                    raise AssertionError("alice's fifth stream was let in")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
                    assert "UploadWeights's next message (8 MiB" in e.details(), e.details()
                assert stub.UploadWeights(iter([header]), metadata=_md("bob"), timeout=10) is not None
                assert stub.Hello(pb.HelloRequest(client_version="t"), metadata=_md("bob"), timeout=10).server_version
            assert mem.held_by("alice") == 4 * per_stream
        finally:
            conn.close()
        _quiet(srv)


def test_a_unary_calls_window_stays_reserved_while_its_method_runs(tmp_path):
    """A ProfileGraph held inside its method (the runtime's own, observed then let run) while its client sends 1 MiB
    more on the call. Before: the window's reservation went back at the first message, so alice held nothing while
    the server had taken in her extra 1 MiB. Now the window is held until the call ends."""
    with _server(tmp_path, max_reading_bytes=16 * MiB) as srv:
        rt, gate = srv.runtime, srv.runtime.calls
        inside, go = threading.Event(), None
        profile = rt.profile

        async def held(*a, **kw):
            nonlocal go
            go = asyncio.Event()
            inside.set()
            await go.wait()
            return await profile(*a, **kw)

        rt.profile = held
        conn = H2Conn("127.0.0.1", srv.port)
        try:
            sid = conn.open("ProfileGraph", _md("alice"))
            req = pb.ProfileGraphRequest(slice_spec_json=b'{"version": 1}', iterations=1).SerializeToString()
            conn.send(sid, grpc_message(req))
            assert inside.wait(10)
            extra = conn.fill(sid, grpc_message(b"", declared=4 * MiB) + b"\x0a" * (4 * MiB - 1), settle_s=1.0)
            assert extra >= gate.window_bytes, extra  # the handler does not read: the window's worth is in grpc
            assert rt.memory.held_by("alice") == gate.window_bytes > 0
            srv.call(_set(lambda: go))
            _until(lambda: sid in conn.ended)
        finally:
            conn.close()
        _quiet(srv)


async def _set(event) -> None:
    event().set()


def test_an_open_session_holds_its_window_and_next_message_and_gives_them_back(tmp_path):
    """An honest Session (grpc's client: OpenSession, then nothing until it closes) holds its window and the message
    limit for alice while open, and nothing after it closes. Before: nothing while open."""
    with _server(tmp_path, max_reading_bytes=16 * MiB) as srv:
        gate, mem = srv.runtime.calls, srv.runtime.memory
        done = threading.Event()

        def messages():
            yield pb.SessionRequest(open=pb.OpenSession(model_id="m"))
            done.wait(20)
            yield pb.SessionRequest(close=pb.CloseSession())

        with grpc.insecure_channel(srv.address) as ch:
            stream = pbg.EdgeServiceStub(ch).Session(messages(), metadata=_md("alice"), timeout=30)
            assert next(stream).WhichOneof("msg") == "opened"
            _until(lambda: mem.held_by("alice") == gate.window_bytes + srv.runtime.config.max_message_bytes)
            done.set()
            for _ in stream:
                pass
        _quiet(srv)


def test_streams_ended_every_way_leave_nothing_reserved(tmp_path):
    """Streams past their first message ended by the client's reset and by their connection's close, a silent call
    ended at its first-message deadline, and a stream refused for the budget: nothing reserved after, and the server
    still answers."""
    with _server(tmp_path, max_reading_bytes=16 * MiB, first_message_s=1.0) as srv:
        srv.runtime.memory.limit_bytes = 60 * MiB  # alice may hold 30 MiB: three streams
        a, b = H2Conn("127.0.0.1", srv.port), H2Conn("127.0.0.1", srv.port)
        try:
            s1, _ = _partial_upload(a, "alice")
            _partial_upload(b, "alice")
            _partial_upload(b, "alice")
            refused, n = _partial_upload(b, "alice")
            # a window or two (grpc may announce a window update as the header message is read: 2097145 B in
            # session 23's CI, 1 of 3 runs here; under 2 MiB in earlier CIs), far from the whole 8 MiB message before
            assert n < DECLARED // 2, n
            _until(lambda: refused in b.ended)  # RESOURCE_EXHAUSTED (its answer may follow the window's settling)
            silent = b.open("Session", _md("alice"))
            _until(lambda: silent in b.ended)  # DEADLINE_EXCEEDED at 1 s
            a.reset(s1)
            per_stream = srv.runtime.calls.window_bytes + srv.runtime.config.max_message_bytes
            _until(lambda: srv.runtime.memory.held_by("alice") == 2 * per_stream)
        finally:
            b.close()
            a.close()
        _quiet(srv)
        with grpc.insecure_channel(srv.address) as ch:
            assert pbg.EdgeServiceStub(ch).Hello(pb.HelloRequest(client_version="t"), metadata=_md("bob"),
                                                 timeout=10).server_version


def test_as_many_colluding_tenants_as_slots_give_one_to_a_waiting_tenant_after_the_contended_deadline(tmp_path):
    """4 reading slots held by alice, bob, carol and dave, one silent Session each (none over its share); erin's Hello.
    Before: erin waited until their ``--first-message-s`` (20 s here; 120 by default) and her call's 6 s timeout ran
    out. Now a holder within its share that has held its slot ``contended_s`` (1 s here) without its first message
    is ended UNAVAILABLE once erin has waited ``reading_grace_s`` (1 s here; the default 5 s made her wait 5 of the
    6 s): she is answered in about a second, one silent call is ended naming the rule, the others keep their slots,
    and nothing stays held after."""
    with _server(tmp_path, max_reading_bytes=32 * MiB, first_message_s=20.0, reading_grace_s=1.0) as srv, \
            grpc.insecure_channel(srv.address) as ch:
        gate = srv.runtime.calls
        gate.slots.contended_s = 1.0
        silent = _Silent(ch, ["alice", "bob", "carol", "dave"])
        try:
            _until(lambda: sum(gate.reading_held().values()) == 4 and gate.server_free == 0)
            t0 = time.monotonic()
            reply = pbg.EdgeServiceStub(ch).Hello(pb.HelloRequest(client_version="t"), metadata=_md("erin"),
                                                  timeout=6)
            waited = time.monotonic() - t0
            assert reply.server_version and 0.5 < waited < 5.5, waited
            _until(lambda: sum(c is not None for c in silent.codes) == 1)
            i = next(i for i, c in enumerate(silent.codes) if c is not None)
            assert silent.codes[i] == grpc.StatusCode.UNAVAILABLE, silent.details[i]
            assert "--contended-first-message-s 1" in silent.details[i], silent.details[i]
            assert gate.taken_back == 1
        finally:
            silent.stop()
        _quiet(srv)


def test_a_refusal_waiting_in_the_tarpit_reads_nothing_when_reads_are_bounded(tmp_path):
    """Callers without a valid token, their refusals held in the tarpit (burst 1, one answer per 2 s): each sends all
    but the last byte of an 8 MiB Hello. Before: the refusal drained its request while it waited, and the pending
    read let each take in 8 MiB outside the budget (40 such calls: RSS +266 MiB; 256 calls an address, 4096 over
    all addresses). Now with reads bounded it reads nothing: each holds at most its window, reserved for its
    address; each still ends UNAUTHENTICATED (the stream ended), and nothing stays reserved."""
    with _server(tmp_path, max_reading_bytes=16 * MiB, tarpit_burst=1, tarpit_rate=0.5) as srv:
        window = srv.runtime.config.read_window_bytes
        conn = H2Conn("127.0.0.1", srv.port)
        try:
            bad = (("authorization", "Bearer not-a-token"),)
            sids = [conn.open("Hello", bad) for _ in range(3)]
            body = grpc_message(b"", declared=DECLARED) + b"\x0a" * (DECLARED - 1)
            taken = [conn.fill(sid, body, settle_s=0.5) for sid in sids[1:]]  # the first is answered at once
            assert max(taken) <= window + SLACK, taken
            _until(lambda: all(sid in conn.ended for sid in sids), timeout=10)
        finally:
            conn.close()
        _quiet(srv)


def test_health_calls_read_their_request_in_a_bounded_gate(tmp_path):
    """The health service needs no token, and grpc read each call's request itself from its start: a stranger at
    127.0.0.2 sends all but the last byte of an 8 MiB Check request on 6 calls. Before: the server took in 8 MiB on
    every one (16 calls: RSS +129 MiB, nothing reserved, no bound on the count). Now the requests are read in the
    health gate's two slots: at most 16 MiB of them in grpc's buffers, the rest hold their windows (reserved for the
    host); a probe from 127.0.0.1 is still answered SERVING within seconds, and nothing stays reserved after."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _server(tmp_path, max_reading_bytes=16 * MiB) as srv:
        window = srv.runtime.config.read_window_bytes
        conn = H2Conn("127.0.0.1", srv.port, source="127.0.0.2")
        try:
            body = grpc_message(b"", declared=DECLARED) + b"\x0a" * (DECLARED - 1)
            sids = [conn.open("Check", service="/grpc.health.v1.Health/") for _ in range(6)]
            taken = sum(conn.fill(sid, body, settle_s=0.5) for sid in sids)
            assert taken <= 2 * DECLARED + 4 * (window + SLACK), taken / MiB
            t0 = time.monotonic()
            with grpc.insecure_channel(srv.address) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=8)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - t0 < 6
        finally:
            conn.close()
        _quiet(srv)


def test_streams_reset_with_a_message_in_part_have_the_heap_trimmed(tmp_path):
    """Three UploadWeights calls each left holding all but the last byte of an 8 MiB message, then reset: the freed
    buffers are noted to the trimmer (24 such streams: RSS +177 MiB after they closed, -2 after one ``malloc_trim``).
    Before: no trim (nothing noted)."""
    with _server(tmp_path, max_reading_bytes=16 * MiB) as srv:
        trimmer = srv.runtime.bounds.trimmer
        if trimmer._trim is None:  # not glibc
            return
        before = trimmer.trims
        conn = H2Conn("127.0.0.1", srv.port)
        try:
            sids = [_partial_upload(conn, "alice")[0] for _ in range(3)]
            for sid in sids:
                conn.reset(sid)
            _until(lambda: trimmer.trims > before)
        finally:
            conn.close()
        _quiet(srv)
