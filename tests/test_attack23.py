"""review23's findings (``/tmp/review23``). F1: with tokens on, callers without one filled the whole ``--memory-mb``
budget for work in flight: each refused call waiting in the tarpit holds its receive window (960 KiB) under
``peer:HOST`` from its start to its end, and nothing capped all such holders together, so bad-token Hellos from 4
loopback addresses held 648 of 649 MiB (692 calls) and a tenant's Hello was RESOURCE_EXHAUSTED "... 1 MiB free".
Now every ``peer:`` holder shares one pool of 1/8 of the budget (``MemoryBudget.pool``); a refused call beyond it is
answered at once. Real servers on port 0; raw HTTP/2 clients (``tests/h2raw.py``) hold the calls, reopening each as
the server ends it."""

from __future__ import annotations

import time

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_server.config import MiB
from edge_server.runtime import STRANGER_BUDGET_DIVISOR
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack21 import _md, _server
from tests.test_attack22b import _Holders


def _beside_this_process(n: int) -> int:
    """``--memory-mb`` leaving ``n`` bytes beside the test process as it is now (the in-process server's sizing takes
    the process's RSS off first: in the full suite a worker's RSS passes 1 GiB, and a bare 1024 MiB left -36 MiB)."""
    return psutil.Process().memory_info().rss + n


def test_strangers_from_many_addresses_leave_the_budget_to_tenants(tmp_path):
    """Before: 648 of 649 MiB reserved by 692 strangers' calls, alice's Hello RESOURCE_EXHAUSTED. Then (session 23's
    tester) her token's health Checks were still her address's, in the full pool: RESOURCE_EXHAUSTED."""
    bad = (("authorization", "Bearer wrong-token"),)
    with _server(tmp_path, memory_bytes=_beside_this_process(1024 * MiB)) as srv:
        mem = srv.runtime.memory
        cap = mem.limit_bytes // STRANGER_BUDGET_DIVISOR
        conns = [{"source": f"127.0.0.{30 + i}", "metadata": bad} for i in range(3)]
        hold = _Holders(srv.port, conns, "Hello", 250)
        health = _Holders(srv.port, [{"source": "127.0.0.40"}], "Check", 16, service="/grpc.health.v1.Health/")
        try:
            seen = 0
            deadline = time.monotonic() + 6.0
            while time.monotonic() < deadline:
                time.sleep(0.5)
                seen = max(seen, mem.stats().reserved_bytes)
                assert mem.pooled_bytes() <= cap
            assert seen <= cap + 8 * MiB, (seen >> 20, cap >> 20)
            assert mem.pooled_bytes() > cap // 2  # the strangers did fill their pool
            with grpc.insecure_channel(srv.address) as ch:
                r = pbg.EdgeServiceStub(ch).Hello(pb.HelloRequest(client_version="t"), metadata=_md("alice"),
                                                  timeout=10)
                assert r.server_version
                # her client's pings (health Checks with her token) are hers, not her address's: session 23's
                # tester, one stranger's address filling the pool, every request of alice's client fell back
                # ("health check: RESOURCE_EXHAUSTED ... callers without a token may hold at most ...")
                for _ in range(3):
                    ok = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), metadata=_md("alice"),
                                                              timeout=10)
                    assert ok.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            hold.stop()
            health.stop()


def test_pool_caps_pooled_holders_together_and_leaves_others_alone():
    from edge_server.errors import ResourceExhausted
    from edge_server.memory import MemoryBudget

    mem = MemoryBudget(800)
    mem.pool("peer:", 100)
    held = [mem.reserve(f"peer:10.0.0.{i}", 40, "w") for i in range(2)]
    try:
        mem.reserve("peer:10.0.0.9", 40, "a call's window")
        raise AssertionError("over the pool")
    except ResourceExhausted as e:
        assert "without a token may hold at most" in str(e)
    assert mem.pooled_bytes() == 80
    mem.reserve("alice", 350, "w").release()  # a tenant is not pooled: its own half
    held[0].release()
    assert mem.pooled_bytes() == 40
    mem.reserve("peer:10.0.0.9", 40, "w")
    assert mem.pooled_bytes() == 80 and mem.stats().reserved_bytes == 80


def test_resending_a_held_weight_does_not_keep_a_half_received_one(tmp_path):
    """F2. Before: any weight's end restarted an upload's idle clock, so alice, with 64 KiB of a 4 MiB weight sent,
    re-sending a 1-byte weight she holds every 0.3 s (idle 1 s) was still open at 8 s, her 4 MiB declared charged.
    Now only ``upload_progress_bytes`` of weights she does not hold restart it: ended DEADLINE_EXCEEDED, staging
    free."""
    import hashlib
    import threading

    from tests.test_staging22 import CACHE, _chunk, _staging, _until, _upload

    # CACHE: room for the 4 MiB weight in alice's reservation (break31 F4: the 16 MiB cache reserves 3 MiB each)

    with _server(tmp_path, session_idle_s=1.0, cache_bytes=CACHE) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        tiny = b"\x07"
        _upload(stub, "alice", tiny)
        tsha = hashlib.sha256(tiny).hexdigest()
        big = hashlib.sha256(b"big23").hexdigest()
        stop = threading.Event()

        def msgs():
            yield pb.UploadWeightsRequest(header=pb.UploadHeader())
            yield _chunk(big, 4 * MiB, b"\x01" * (64 << 10))
            while not stop.wait(0.3):
                yield _chunk(tsha, 1, tiny)

        fut = stub.UploadWeights.future(msgs(), metadata=_md("alice"), timeout=30)
        try:
            t0 = time.monotonic()
            while not fut.done() and time.monotonic() - t0 < 6:
                time.sleep(0.1)
            assert fut.done(), "the upload kept alive by re-sent held weights was not ended"
            assert fut.exception() is not None and fut.code() == grpc.StatusCode.DEADLINE_EXCEEDED, fut.exception()
            assert time.monotonic() - t0 < 4
        finally:
            stop.set()
            fut.cancel()
        _until(lambda: _staging(srv) == 0 and _staging(srv, "alice") == 0)


def test_upload_progress_bytes_is_range_checked():
    import pytest

    from edge_server.config import ServerConfig

    for bad in (0, -1, 0.5):
        with pytest.raises(ValueError, match="upload_progress_bytes"):
            ServerConfig(upload_progress_bytes=bad)
    assert ServerConfig(upload_progress_bytes=1).upload_progress_bytes == 1


def test_a_session_that_cannot_hold_its_next_read_is_refused_before_opened(tmp_path):
    """F6. Before: the message limit a Session holds for its reads was reserved when its handler asked for the
    second message, after "opened" was sent, so alice at her share of the budget was answered "opened" and then
    RESOURCE_EXHAUSTED. Now she is refused at open: the first answer is RESOURCE_EXHAUSTED."""
    import threading

    with _server(tmp_path, memory_bytes=_beside_this_process(1024 * MiB)) as srv:
        gate, mem = srv.runtime.calls, srv.runtime.memory
        cap = int(mem.limit_bytes * mem.holder_fraction)
        filler = mem.reserve("alice", cap - gate.window_bytes - 4 * MiB, "the test's filler")
        done = threading.Event()

        def messages():
            yield pb.SessionRequest(open=pb.OpenSession(model_id="m"))
            done.wait(20)

        try:
            with grpc.insecure_channel(srv.address) as ch:
                stream = pbg.EdgeServiceStub(ch).Session(messages(), metadata=_md("alice"), timeout=30)
                try:
                    first = next(stream)
                    raise AssertionError(f"answered {first.WhichOneof('msg')} before the refusal")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    assert "next message" in e.details()
                finally:
                    done.set()
            assert srv.runtime.sessions.sessions_opened == 0
        finally:
            filler.release()


def test_a_contended_take_back_ends_the_newest_call_after_the_waiters_grace():
    """F5. Two keys hold the 2 server-wide slots within their share, both past ``contended_s``; a third key's call
    queues. Before: the oldest holder (the most of its message received) was ended at once. Now the newest is,
    once the waiter has waited ``reading_grace_s``."""
    import asyncio

    from edge_server.calls import CallGate

    async def main():
        loop = asyncio.get_running_loop()
        g = CallGate(256, 32, 120.0, server_reading=2, reading_grace_s=0.5, contended_s=0.3)
        ended: dict[str, tuple[float, object]] = {}

        async def hold(key: str) -> None:
            call = g.enter(key, method=key)
            try:
                await g.reading(call)
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                ended[key] = (loop.time(), call.reason)
            finally:
                g.leave(call)

        tasks = [asyncio.create_task(hold("tenant:a"))]
        await asyncio.sleep(0.1)
        tasks.append(asyncio.create_task(hold("tenant:b")))
        await asyncio.sleep(0.5)
        t_c = loop.time()
        tasks.append(asyncio.create_task(hold("tenant:c")))
        while not ended and loop.time() - t_c < 3:
            await asyncio.sleep(0.02)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return ended, t_c

    ended, t_c = asyncio.run(main())
    first = min(ended, key=lambda k: ended[k][0])
    assert first == "tenant:b", ended
    assert ended[first][0] - t_c >= 0.45, ended[first][0] - t_c
    assert "reading slot was given to another caller" in str(ended[first][1])
