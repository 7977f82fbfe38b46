"""review20b finding 2: with ``--max-reading-mb``, one key's silent calls held every server-wide reading slot (taken
before the first message arrives) and every other tenant's calls waited up to ``first_message_s``. Now a key holds
at most ``ReadingSlots.max_share`` (half) of them, and a stream gives its server slot back once its first message is
decoded. A real server on port 0 (short ``first_message_s``) and the gate itself. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import grpc

from edge_server.calls import CallGate
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack18 import ALICE, BOB, _md
from tests.test_attack20 import MiB, _server


def test_one_keys_silent_calls_leave_server_reading_slots_to_the_others(tmp_path):
    """Before: bob's 4 Session calls that never send a message held all 4 server slots, alice's Hello waited
    ``first_message_s`` (DEADLINE_EXCEEDED after 3 s, ``p3_silent_reading_slots``). Now bob holds 2 of 4."""
    stop = threading.Event()

    def silent():  # the first message never comes (until the test ends)
        stop.wait(30)
        return
        yield

    with _server(tmp_path, max_reading_bytes=32 * MiB, first_message_s=6.0) as srv, \
            grpc.insecure_channel(srv.address) as honest, grpc.insecure_channel(srv.address) as att:
        gate = srv.runtime.calls
        assert gate.server_reading == 4
        stub = pbg.EdgeServiceStub(honest)
        stub.Hello(pb.HelloRequest(client_version="x"), metadata=_md(ALICE), timeout=10)
        calls = [pbg.EdgeServiceStub(att).Session(silent(), timeout=20, metadata=_md(BOB)) for _ in range(4)]
        def start(c) -> None:  # starts the call; it ends cancelled
            with contextlib.suppress(grpc.RpcError):
                next(c, None)

        threads = [threading.Thread(target=start, args=(c,), daemon=True) for c in calls]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + 5
            while sum(len(w) for w in gate._waiting.values()) < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # bob's calls are at their slots
            for _ in range(3):  # before: each waited for first_message_s (6 s), past this deadline
                stub.Hello(pb.HelloRequest(client_version="x"), metadata=_md(ALICE), timeout=4)
            assert gate.server_free == 2 and gate.server_share == 2  # bob holds his share, no more
        finally:
            stop.set()
            for c in calls:
                c.cancel()
            for t in threads:
                t.join(10)


def test_a_keys_share_of_the_server_slots_is_bounded():
    """A key takes at most ``server_share`` server slots; another key's read goes past its waiting calls."""

    async def run():
        gate = CallGate(server_reading=4)
        bob = [gate.enter("tenant:bob") for _ in range(3)]
        assert await gate.reading(bob[0]) and await gate.reading(bob[1])
        third = asyncio.ensure_future(gate.reading(bob[2]))
        await asyncio.sleep(0.05)
        assert not third.done()
        alice = gate.enter("tenant:alice")
        assert await asyncio.wait_for(gate.reading(alice), 1.0)
        gate.server_read_done(bob[0])
        assert await asyncio.wait_for(third, 1.0)
        for c in (*bob, alice):
            gate.leave(c)
        assert gate.server_free == 4 and not gate.reading_held() and not gate.reading_queued()

    asyncio.run(run())


def test_a_streams_server_slot_goes_back_once_its_first_message_is_decoded():
    """The wire handler's first read (``wire._checked``): the server slot goes back when the first message is
    decoded, the key's slot (``max_reading``) when the handler asks for the second. Before: both at the second."""
    from edge_server.wire import _checked

    async def messages():
        yield pb.HelloRequest(client_version="a")
        yield pb.HelloRequest(client_version="b")

    async def run():
        gate = CallGate(server_reading=2, max_reading=1)
        call = gate.enter("tenant:bob")
        it = _checked(messages(), call, gate)
        first = await anext(it)
        assert first.client_version == "a"
        assert gate.server_free == 2 and not call.server_reading  # the server's slot is back
        assert call.reading  # the key's is held while the handler holds the first message
        assert (await anext(it)).client_version == "b"
        assert not call.reading
        gate.leave(call)

    asyncio.run(run())
