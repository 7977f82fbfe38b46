"""Session 19's attacker, from outside: the budgets session 18 added (``--max-reading-calls``, the slice validation
CPU budget), as review18 broke them with raw gRPC clients (grpc.aio / grpc, the project's protos, not our client).
Each test starts a real server on port 0 and attacks it as a stranger would; each failed before its fix.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack18 import ALICE, BOB, _define, _md, tril_chain

METHOD = "/coinfer.v1.EdgeService/"


def _server(tmp_path, **config) -> ServerThread:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {"alice": {"token": ALICE}, "bob": {"token": BOB}}}))
    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=str(path), **config)
    return ServerThread(config=cfg)


async def _silent_hello(ch: grpc.aio.Channel, token: str):
    """A Hello call that sends its headers and no message: it holds one of its caller's reading slots while it
    waits (until cancelled or the first-message deadline)."""
    never = asyncio.Event()

    async def nothing():
        await never.wait()
        yield b""  # never reached

    call = ch.stream_unary(METHOD + "Hello", request_serializer=lambda b: b,
                           response_deserializer=pb.HelloResponse.FromString)(nothing(), metadata=_md(token),
                                                                               timeout=30)
    return call


async def _then_wait(first):
    """A request stream of ``first``, then nothing until cancelled (an idle open session)."""
    yield first
    await asyncio.Event().wait()


def test_a_sessions_first_message_is_read_in_a_reading_slot(tmp_path):
    """review18 F5: ``--max-reading-calls`` bounded unary calls only; a Session's first message (an OpenSession, up
    to the message limit with its slice) was read with no slot: 48 Session calls with 4 MiB OpenSessions took
    +268-332 MiB against +36 MiB for as many Hellos. Now a stream's first read takes one of its caller's slots: with
    the one slot held by a silent call, alice's Session is not opened (its OpenSession is not read) until that call
    ends, while bob (another caller) opens his at once; the slot is held while the first message is processed (an
    OpenSession's slice waits for the validation slot: given back once decoded, 48 such calls still took +315 MiB)
    and given back when the handler asks for the next message: an open, idle session holds none."""
    srv = _server(tmp_path, max_reading_calls_per_caller=1)

    async def attack():
        async with grpc.aio.insecure_channel(srv.address) as ch:
            silent = await _silent_hello(ch, ALICE)
            await asyncio.sleep(0.3)  # its slot taken

            async def opened(token: str) -> float:
                t0 = time.perf_counter()
                session = ch.stream_stream(METHOD + "Session", request_serializer=pb.SessionRequest.SerializeToString,
                                           response_deserializer=pb.SessionResponse.FromString)(
                    iter([pb.SessionRequest(open=pb.OpenSession(model_id="m"))]), metadata=_md(token), timeout=30)
                try:
                    async for msg in session:
                        assert msg.HasField("opened"), msg
                        return time.perf_counter() - t0
                finally:
                    session.cancel()
                raise AssertionError("no answer")

            assert await asyncio.wait_for(opened(BOB), 10) < 5
            alice = asyncio.ensure_future(opened(ALICE))
            done, _ = await asyncio.wait([alice], timeout=1.0)
            assert not done, "alice's OpenSession was read with her one reading slot held by another call"
            silent.cancel()
            assert await asyncio.wait_for(alice, 10) >= 1.0
            # an opened session gives its slot back (held only while its first message is processed): alice's Hello
            # goes through beside her open, idle session
            idle = ch.stream_stream(METHOD + "Session", request_serializer=pb.SessionRequest.SerializeToString,
                                    response_deserializer=pb.SessionResponse.FromString)(
                _then_wait(pb.SessionRequest(open=pb.OpenSession(model_id="m"))), metadata=_md(ALICE), timeout=30)
            assert (await idle.read()).HasField("opened")
            hello = ch.unary_unary(METHOD + "Hello", request_serializer=pb.HelloRequest.SerializeToString,
                                   response_deserializer=pb.HelloResponse.FromString)
            await asyncio.wait_for(hello(pb.HelloRequest(client_version="x"), metadata=_md(ALICE)), 5)
            idle.cancel()

    with srv:
        asyncio.run(attack())


def test_a_slow_unary_handler_gives_its_reading_slot_back_once_its_request_is_decoded(tmp_path):
    """review18 F9: a unary call held its caller's reading slot for its whole handler, so with ``--max-reading-calls
    1`` alice's Hello waited behind her ProfileGraph's validation (seconds for a big slice). Now the slot is given
    back once the request is decoded: the Hello is answered while the ProfileGraph still runs (its spec's bytes are
    reserved in the memory budget while it does)."""
    srv = _server(tmp_path, max_reading_calls_per_caller=1)
    with srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        profile = stub.ProfileGraph.future(pb.ProfileGraphRequest(slice_spec_json=tril_chain(8000)),
                                           metadata=_md(ALICE), timeout=120)
        time.sleep(0.5)  # its request read (~0.5 MB); its validation takes ~4 CPU s
        t0 = time.perf_counter()
        stub.Hello(pb.HelloRequest(client_version="x"), metadata=_md(ALICE), timeout=60)
        waited = time.perf_counter() - t0
        assert not profile.done(), "the Hello waited for the ProfileGraph's end (or its slice is too small to tell)"
        assert waited < 3.0, waited
        assert srv.runtime.bounds.memory.held_by("alice") >= len(tril_chain(8000))  # the spec, while it runs
        try:
            profile.result()
        except grpc.RpcError as e:  # over the profile CPU budget on a slow machine: fine, it was running
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        assert srv.runtime.bounds.memory.held_by("alice") == 0


def test_a_small_slice_is_validated_while_another_tenants_big_one_still_runs(tmp_path):
    """review18 F6: one server-wide validation slot, held by a validation to its end (or its tenant's budget's):
    bob's 3-op slice waited 10.5 s behind alice's 50k-op one. Now the running validation gives the slot up at its
    next check point when another tenant waits (``edge_server.memory.ValidationSlot``): bob's slice is defined in
    well under a second while alice's is still validating, and alice's still ends as before (stopped by her budget)."""
    srv = _server(tmp_path, slice_cpu_s=3.0, slice_cpu_share=0.01)
    with srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        big = tril_chain(30000)  # ~15 CPU s unbounded here: stopped at alice's 3
        alice: dict = {}
        th = threading.Thread(target=lambda: alice.update(r=_define(stub, ALICE, big, timeout=120)[0]))
        th.start()
        time.sleep(1.0)  # alice's validation running
        assert th.is_alive()
        (ok, waited), = _define(stub, BOB, tril_chain(3), timeout=60)
        assert ok.HasField("slice_defined"), ok
        assert th.is_alive(), "bob's slice waited for the end of alice's validation (or hers is too small to tell)"
        assert waited < 2.5, waited  # ~0.02 s here unloaded
        th.join(120)
        first, _ = alice["r"]
        assert first.HasField("slice_rejected") and "slice validation stopped" in first.slice_rejected.message, first
        assert srv.runtime.bounds.compile_slots.yields >= 1
        assert srv.runtime.bounds.compile_slots.idle
        assert srv.runtime.slice_budget.charged_s["alice"] < 4.5  # her own CPU only, not bob's


def test_bounded_reads_without_the_call_gate_is_refused_by_the_cli():
    """review18 F8: ``--max-reading-calls N`` with ``--max-calls-per-caller 0`` (no call gate) bounded nothing, since
    the bound lives in the gate, and still turned grpc's BDP probing off: now a one-line error, exit 2."""
    import subprocess
    import sys

    from tests.test_server_cli import ENV, ROOT

    r = subprocess.run([sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--max-reading-calls", "2",
                        "--max-calls-per-caller", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-reading-calls needs the call gate" in lines[0], r.stderr


def test_a_slice_that_needs_more_than_the_whole_validation_budget_is_refused_for_good(tmp_path):
    """review18 F11: a slice whose validation needs more CPU than the tenant's whole slice validation budget was
    stopped RESOURCE_EXHAUSTED "retry in N s", and every retry, once the bucket refilled, was stopped again: a retry
    time that never succeeds. Now a validation that spent more than the whole budget and is not done is refused
    FAILED_PRECONDITION (permanent; ``ue_client.refusals`` leaves such a slice out) with a message saying so and no
    retry time; one stopped by a bucket only partly refilled is still RESOURCE_EXHAUSTED with its retry time."""
    srv = _server(tmp_path, slice_cpu_s=0.1, slice_cpu_share=0.02)
    with srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        big = tril_chain(2000)  # ~1 CPU s unbounded here
        (first, _), = _define(stub, ALICE, big)
        assert first.HasField("slice_rejected"), first
        assert first.slice_rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], first
        msg = first.slice_rejected.message
        assert "more than the whole slice validation CPU budget of tenant 'alice'" in msg, msg
        assert "can never pass" in msg and "retry in" not in msg, msg
        # bob's bucket partly spent (0.04 of 0.1 CPU s left): his big slice stops transiently (the wait would refill it)
        srv.runtime.slice_budget.charge("bob", 0.06)
        (second, _), = _define(stub, BOB, big)
        assert second.HasField("slice_rejected"), second
        assert second.slice_rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], second
        assert "retry in" in second.slice_rejected.message, second
        # its retry time: when the bucket again holds what the stopped validation already took (> 0.04 CPU s at
        # 0.02 per s), not when it is merely positive (was "retry in 0.0 s": stopped again at once, retry after retry)
        import re

        retry = float(re.search(r"retry in ([0-9.]+) s", second.slice_rejected.message).group(1))
        assert retry >= 1.5, second.slice_rejected.message


def test_the_validation_slot_goes_round_robin_between_tenants_and_survives_cancelled_waiters():
    """``ValidationSlot`` alone (the server's use is above): a holder yields only to another tenant's waiter, the
    tenants take turns (a paused validation before its tenant's next one), a cancelled waiter is skipped, and the slot
    ends free."""
    from edge_server.memory import ValidationSlot

    async def run():
        slot = ValidationSlot()
        order: list[str] = []
        await slot.acquire("a")  # a's first validation holds it
        a2 = asyncio.ensure_future(slot.acquire("a"))
        await asyncio.sleep(0)
        await asyncio.to_thread(slot.yield_point, "a")  # only a's own waits: goes on, no yield
        assert slot.yields == 0 and not a2.done()
        b = asyncio.ensure_future(slot.acquire("b"))
        c = asyncio.ensure_future(slot.acquire("c"))
        await asyncio.sleep(0)
        c.cancel()
        await asyncio.sleep(0)

        def a1():  # a's running validation: reaches a check point, yields to b, resumes after b
            slot.yield_point("a")
            order.append("a1 resumed")
            slot.release()

        t = asyncio.ensure_future(asyncio.to_thread(a1))
        await asyncio.wait_for(b, 5)
        order.append("b runs")
        assert not a2.done()
        slot.release()  # b done: a's paused one resumes before a2
        await t
        await asyncio.wait_for(a2, 5)
        order.append("a2 runs")
        slot.release()
        assert order == ["b runs", "a1 resumed", "a2 runs"], order
        assert slot.yields == 1 and slot.idle

    asyncio.run(run())


def test_a_paused_validation_resumes_when_the_server_closes():
    """A paused validation waits for a grant that, once the server's loop stopped, may never come; the pool's threads
    are joined at the interpreter's exit, so it would hang it: ``close`` resumes every paused validation and none
    pauses after."""
    from collections import deque

    from edge_server.memory import ValidationSlot, _Waiter

    slot = ValidationSlot()
    slot._holder = "a"
    slot._queues["b"] = deque([_Waiter("b", lambda: None)])  # a grant that goes nowhere (a stopped loop)
    t = threading.Thread(target=slot.yield_point, args=("a",), daemon=True)
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and slot.yields == 1  # paused
    slot.close()
    t.join(5)
    assert not t.is_alive()
    slot._queues["c"] = deque([_Waiter("c", lambda: None)])
    slot.yield_point("a")  # closed: no pause
    assert slot.yields == 1


def test_a_profile_validation_over_the_whole_budget_is_refused_for_good_in_a_profiling_child_too(tmp_path):
    """review19 F5: with ``--profile-workers N`` the parent charges the child's CPU in pieces every 20 ms and checked
    the bucket with nothing in progress: a ProfileGraph whose validation needs more than the tenant's whole bucket
    was answered RESOURCE_EXHAUSTED "retry in 0.1 s" (the bucket merely positive again), and every retry killed and
    respawned a child. Now the job's CPU since it began is the work in progress (``_ChildCpu.tick``): the answers are
    the in-process ones, FAILED_PRECONDITION "can never pass" without a retry time, and for a bucket only partly
    spent RESOURCE_EXHAUSTED with a retry time at which the bucket holds what the stopped validation took."""
    import re

    srv = _server(tmp_path, profile_workers=1, profile_cpu_s=0.5, profile_cpu_share=0.02)
    with srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        big = tril_chain(4000)  # ~2 CPU s of validation unbounded here
        req = pb.ProfileGraphRequest(slice_spec_json=big, iterations=1)
        try:
            stub.ProfileGraph(req, metadata=_md(ALICE), timeout=120)
            raise AssertionError("not stopped")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.code(), e.details())
            assert "more than the whole ProfileGraph CPU budget of tenant 'alice'" in e.details(), e.details()
            assert "can never pass" in e.details() and "retry in" not in e.details(), e.details()
        assert srv.runtime.sandbox is not None and srv.runtime.sandbox.budget_kills == 1  # in the child, validating
        # bob's bucket partly spent (0.1 of 0.5 CPU s left; a margin of 0.4 CPU s for a late charge on a loaded
        # machine): stopped transiently, told to retry when the bucket holds what the stopped validation took (> 0.1
        # CPU s, from below zero, at 0.02 per s: > 5 s), not when it is merely positive (its overshoot / 0.02: ~1 s)
        srv.runtime.profile_budget.charge("bob", 0.4)
        try:
            stub.ProfileGraph(req, metadata=_md(BOB), timeout=120)
            raise AssertionError("not stopped")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
            retry = float(re.search(r"retry in ([0-9.]+) s", e.details()).group(1))
            assert retry >= 4.5, e.details()
        assert srv.runtime.memory.stats().reserved_bytes == 0


def test_validations_in_progress_at_once_are_bounded_by_the_memory_budget(tmp_path, monkeypatch):
    """review19 F4: the validation slot's turns keep up to ``max_paused`` + 1 validations in progress at once (one
    per tenant), each holding its parsed spec and meta values (~23 B per spec byte), while ProfileGraph reserved 1 B
    per spec byte: 16 tenants' 6.45 MiB specs, +1629 MiB of RSS beside a budget peak of 103 MiB. Now a validation in
    progress reserves ``VALIDATION_BYTES_PER_SPEC_BYTE`` per spec byte while it runs, paused or not
    (``Bounds.compile``): four tenants' ProfileGraphs at once under a budget that fits two such validations have at
    most two in progress. The other two wait for a turn in which they fit (review20 F6: they were refused
    RESOURCE_EXHAUSTED although each fitted alone, because the turns had paused others): all four are answered."""
    from edge_server.session import VALIDATION_BYTES_PER_SPEC_BYTE

    tenants = {"alice": ALICE, "bob": BOB, "carol": "carol-secret-8901", "dave": "dave-secret-23456"}
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {t: {"token": k} for t, k in tenants.items()}}))
    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=str(path))
    spec = tril_chain(2500)  # ~1 CPU s of validation here; 0.36 MiB
    work = VALIDATION_BYTES_PER_SPEC_BYTE * len(spec)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        mem, slot = srv.runtime.memory, srv.runtime.bounds.compile_slots
        mem.limit_bytes = int(2.5 * work) + 4 * len(spec)  # two validations in progress, and the four specs waiting
        mem.holder_fraction = 1.0
        import edge_server.profile_service

        compile_slice, lock, now, in_progress = edge_server.profile_service.compile_slice, threading.Lock(), [0], [0]

        def counted(*a, **kw):  # the validations in progress (the server's own compile_slice, counted)
            with lock:
                now[0] += 1
                in_progress[0] = max(in_progress[0], now[0])
            try:
                return compile_slice(*a, **kw)
            finally:
                with lock:
                    now[0] -= 1

        monkeypatch.setattr(edge_server.profile_service, "compile_slice", counted)
        stub = pbg.EdgeServiceStub(ch)
        futs = [stub.ProfileGraph.future(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1),
                                         metadata=_md(k), timeout=120) for k in tenants.values()]
        answers = []
        for f in futs:
            try:
                answers.append(("OK", len(f.result().ops)))
            except grpc.RpcError as e:
                answers.append((e.code().name, e.details()))
        assert in_progress[0] <= 2, (in_progress[0], answers)  # was 4: every tenant's, paused in turns
        assert answers == [("OK", 2500)] * 4, answers
        assert mem.stats().peak_bytes >= work and mem.stats().reserved_bytes == 0
        assert slot.yields >= 1 and slot.idle


def test_a_define_slice_reserves_its_validations_working_memory_beyond_its_slice_charge(tmp_path):
    """review19 F4, DefineSlice's side: a session's slice was charged ``SLICE_BYTES_PER_SPEC_BYTE`` (16) per spec
    byte, what the compiled slice keeps, while its validation in progress holds more (the parsed spec and the meta
    values beside the slice being built: ~19-23). Now the validation reserves the rest up to
    ``VALIDATION_BYTES_PER_SPEC_BYTE`` while it runs: a budget that holds the slice's charge and not its validation's
    refuses the slice RESOURCE_EXHAUSTED, naming its working memory, and holds nothing after; one that holds both
    defines it, and the slice then holds its charge alone."""
    from edge_server.session import SLICE_BYTES_PER_SPEC_BYTE, VALIDATION_BYTES_PER_SPEC_BYTE

    spec = tril_chain(200)
    srv = _server(tmp_path)
    with srv, grpc.insecure_channel(srv.address) as ch:
        stub, mem = pbg.EdgeServiceStub(ch), srv.runtime.memory
        mem.holder_fraction = 1.0
        mem.limit_bytes = (SLICE_BYTES_PER_SPEC_BYTE + VALIDATION_BYTES_PER_SPEC_BYTE) // 2 * len(spec)
        (msg, _), = _define(stub, ALICE, spec)
        assert msg.HasField("slice_rejected"), msg  # was defined: the validation's working memory was no one's
        assert msg.slice_rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], msg
        assert "the validation of slice 's0'" in msg.slice_rejected.message, msg
        assert "working memory" in msg.slice_rejected.message, msg
        assert mem.stats().reserved_bytes == 0
        mem.limit_bytes = VALIDATION_BYTES_PER_SPEC_BYTE * len(spec) + 4096
        done = threading.Event()

        def requests():  # the session stays open until the end (its slice defined, its charge held)
            yield pb.SessionRequest(open=pb.OpenSession(model_id="m"))
            yield pb.SessionRequest(define_slice=pb.DefineSlice(slice_id="s0", slice_spec_json=spec))
            done.wait(60)

        call = stub.Session(requests(), metadata=_md(ALICE), timeout=60)
        assert next(call).HasField("opened")
        msg = next(call)
        while not (msg.HasField("slice_defined") or msg.HasField("slice_rejected")):
            msg = next(call)
        assert msg.HasField("slice_defined"), msg
        assert mem.held_by("alice") == SLICE_BYTES_PER_SPEC_BYTE * len(spec)  # the slice's charge alone
        done.set()
        call.cancel()
