"""Session 17's attacker, from outside: faults found with raw gRPC clients (grpc.aio, the project's protos, not our
client) and fixed. Each test starts a real server on port 0 and attacks it as a stranger would; each failed before
its fix (``edge_server.calls``: the call gate).

Measured before the fix (docs/results/attack/session17/): 6000 calls that sent headers and no message held the
server from 352 to 484 MiB RSS, all still open 25 s later; an UploadWeights mid-weight and a running ProfileGraph
went on for at least 20 s after their token was revoked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time

import grpc
import pytest

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.slice_json import meta, zeros

ALICE, BOB = "alice-secret-123", "bob-secret-4567"
SVC = "/coinfer.v1.EdgeService/"


def _md(token):
    return (("authorization", f"Bearer {token}"),)


def _tokens(tmp_path, **tenants):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {k: {"token": v} for k, v in tenants.items()}}))
    return path


def _server(tmp_path, **config):
    path = _tokens(tmp_path, alice=ALICE, bob=BOB)
    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=str(path), **config)
    return ServerThread(config=cfg), path


def _methods(ch):
    """Raw callables of the three kinds, as a stranger's client makes them (a unary method called as the request
    stream it is on the wire: headers, then no message)."""
    return {
        "Session": ch.stream_stream(SVC + "Session", request_serializer=pb.SessionRequest.SerializeToString,
                                    response_deserializer=pb.SessionResponse.FromString),
        "Hello": ch.stream_unary(SVC + "Hello", request_serializer=pb.HelloRequest.SerializeToString,
                                 response_deserializer=pb.HelloResponse.FromString),
        "UploadWeights": ch.stream_unary(SVC + "UploadWeights",
                                         request_serializer=pb.UploadWeightsRequest.SerializeToString,
                                         response_deserializer=pb.UploadWeightsResponse.FromString),
    }


async def _code(call, timeout):
    """The call's status once it ends within ``timeout`` s, else None (still open)."""
    try:
        return await asyncio.wait_for(call.code(), timeout)
    except TimeoutError:
        return None


async def _hello(ch, token):
    m = ch.unary_unary(SVC + "Hello", request_serializer=pb.HelloRequest.SerializeToString,
                       response_deserializer=pb.HelloResponse.FromString)
    return await m(pb.HelloRequest(), metadata=_md(token), timeout=30)


def test_calls_without_a_first_message_end_at_its_deadline(tmp_path):
    """A call that sends its headers and never its first message (OpenSession, the UploadHeader, a unary call's
    request) was awaited for ever (the idle timeout starts once a session exists). Now DEADLINE_EXCEEDED after
    ``first_message_s``, and the gate holds no call of it."""
    srv, _ = _server(tmp_path, first_message_s=1.0)

    async def attack(addr):
        async with grpc.aio.insecure_channel(addr) as ch:
            calls = {k: m(metadata=_md(ALICE)) for k, m in _methods(ch).items()}
            t0 = time.monotonic()
            codes = {k: await _code(c, 15) for k, c in calls.items()}
            took = time.monotonic() - t0
            assert (await _hello(ch, ALICE)).limits.max_chunk_bytes  # the tenant is served on
            return codes, took

    with srv:
        codes, took = asyncio.run(attack(srv.address))
        assert codes == dict.fromkeys(("Session", "Hello", "UploadWeights"), grpc.StatusCode.DEADLINE_EXCEEDED)
        assert 0.8 < took < 10
        assert srv.runtime.calls.open_calls() == 0


def test_calls_waiting_for_their_first_message_beyond_the_bound_end_oldest_first(tmp_path):
    """A token's silent calls were counted by nothing: 6000 held ~130 MiB. Now at most ``max_waiting`` wait per
    caller; one more ends the oldest RESOURCE_EXHAUSTED, so an honest call (its first message at once) goes on."""
    srv, _ = _server(tmp_path, first_message_s=60.0, max_waiting_calls_per_caller=4)

    async def attack(addr):
        async with grpc.aio.insecure_channel(addr) as ch:
            session = _methods(ch)["Session"]
            calls = []
            for _ in range(10):
                calls.append(session(metadata=_md(ALICE)))
                await asyncio.sleep(0.05)  # arrival order = age
            codes = [await _code(c, 5) for c in calls[:6]]
            codes += await asyncio.gather(*(_code(c, 1) for c in calls[6:]))  # each still open 1 s on, together
            honest = session(metadata=_md(ALICE))
            await honest.write(pb.SessionRequest(open=pb.OpenSession(model_id="m")))
            opened = await asyncio.wait_for(honest.read(), 30)
            await honest.done_writing()
            for c in calls[6:]:
                c.cancel()
            return codes, opened

    with srv:
        codes, opened = asyncio.run(attack(srv.address))
        assert codes[:6] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 6 and codes[6:] == [None] * 4
        assert opened.HasField("opened")


def test_calls_open_per_caller_are_bounded_and_other_tenants_go_on(tmp_path):
    """An UploadWeights that sent its header and then nothing lives until the idle timeout (300 s), and nothing
    counted how many a token held. Now a caller has at most ``max_calls_per_caller`` calls open; one more is
    RESOURCE_EXHAUSTED at once; another tenant is not affected; closing them frees the caller's slots."""
    srv, _ = _server(tmp_path, max_calls_per_caller=8)

    async def attack(addr):
        async with grpc.aio.insecure_channel(addr) as ch:
            upload = _methods(ch)["UploadWeights"]
            held = []
            for _ in range(8):
                c = upload(metadata=_md(ALICE))
                await c.write(pb.UploadWeightsRequest(header=pb.UploadHeader()))
                held.append(c)
            await asyncio.sleep(0.5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _hello(ch, ALICE)
            bob = await _hello(ch, BOB)
            for c in held:
                c.cancel()
            await asyncio.sleep(0.5)
            return e.value, bob, await _hello(ch, ALICE)

    with srv:
        refused, bob, again = asyncio.run(attack(srv.address))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "calls of this caller" in refused.details()
        assert bob.limits.max_chunk_bytes and again.limits.max_chunk_bytes


async def _stranger_flood(addr, n):
    """``n`` Hello calls with a bad token at once: each one's status after 2 s (None: still waiting in the
    tarpit), and a tenant's Hello answered meanwhile."""
    async with grpc.aio.insecure_channel(addr) as ch:
        hello = _methods(ch)["Hello"]
        calls = [hello(metadata=_md("not-a-token")) for _ in range(n)]
        await asyncio.wait([asyncio.ensure_future(c.code()) for c in calls], timeout=2)
        codes = [(await c.code()) if c.done() else None for c in calls]
        ok = await _hello(ch, ALICE)
        for c in calls:
            c.cancel()
        return codes, ok


def test_strangers_refusals_waiting_in_the_tarpit_are_bounded(tmp_path):
    """Calls without a token wait in the tarpit for their refusal, each ~22 KB of the server, and nothing counted
    them: an address could keep thousands waiting. Now at most ``max_calls_per_caller`` per address wait; the
    rest are refused at once, and a tenant's calls are served meanwhile."""
    srv, _ = _server(tmp_path, max_calls_per_caller=8, tarpit_rate=0.2, tarpit_burst=1)

    with srv:
        codes, ok = asyncio.run(_stranger_flood(srv.address, 24))
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= 24 - 8
        assert codes.count(None) <= 8
        assert ok.limits.max_chunk_bytes


def test_strangers_at_many_addresses_are_bounded_together():
    """Each address has its own bound, and 127.0.0.0/8 alone is 16M addresses: the calls of all callers known by
    their address (no valid token) are bounded together too; a tenant's calls are not counted there."""
    from edge_server.calls import CallGate
    from edge_server.errors import ResourceExhausted

    async def run():
        gate = CallGate(max_calls=4, max_waiting=4, first_message_s=0, max_peer_calls=3)
        calls = [gate.enter(f"peer:127.0.0.{i}") for i in range(1, 4)]
        with pytest.raises(ResourceExhausted, match="without a token"):
            gate.enter("peer:127.0.0.9")
        tenant = [gate.enter("tenant:alice") for _ in range(4)]
        with pytest.raises(ResourceExhausted, match="this caller"):
            gate.enter("tenant:alice")
        gate.leave(calls[0])
        gate.leave(calls[0])  # idempotent
        calls.append(gate.enter("peer:127.0.0.9"))
        for c in calls[1:] + tenant:
            gate.leave(c)
        return gate.open_calls(), gate.refused

    assert asyncio.run(run()) == (0, 2)


def test_callers_whose_calls_timed_out_leave_no_entry_behind():
    """review17 F3: a call ended by the first-message deadline was taken off its caller's waiting calls, but the
    caller's (empty) entry stayed: one per address that ever timed out, for ever (~352 B each). Now gone."""
    from edge_server.calls import CallGate

    async def run():
        gate = CallGate(max_calls=4, max_waiting=4, first_message_s=0.05)

        async def handler(i):  # a call's handler: registered, then silent until the gate ends it
            call = gate.enter(f"peer:10.0.0.{i}", method="Hello")
            try:
                await asyncio.sleep(30)
            finally:
                gate.leave(call)

        tasks = [asyncio.create_task(handler(i)) for i in range(50)]
        done, pending = await asyncio.wait(tasks, timeout=10)
        assert not pending and all(t.cancelled() for t in done)
        return len(gate._waiting), gate.open_calls(), gate.evicted

    waiting, open_, evicted = asyncio.run(run())
    assert (waiting, open_, evicted) == (0, 0, 50)


def test_strangers_refusals_over_the_servers_bound_are_answered_at_once(tmp_path):
    """The same through a real server: refusals of callers without a token wait in the tarpit, at most
    ``max_stranger_calls`` of them at once over all addresses; the rest are answered at once."""
    srv, _ = _server(tmp_path, max_stranger_calls=6, tarpit_rate=0.2, tarpit_burst=1)

    with srv:
        codes, ok = asyncio.run(_stranger_flood(srv.address, 20))
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= 20 - 6 and codes.count(None) <= 6
        assert ok.limits.max_chunk_bytes


def _chain(n):
    ops = [zeros("x0", [256, 256])]
    for i in range(1, n):
        ops.append({"name": f"x{i}", "target": "aten.mm.default", "args": [{"t": f"x{i - 1}"}, {"t": f"x{i - 1}"}],
                    "kwargs": {}, "outputs": [meta([256, 256])]})
    return json.dumps({"version": 1, "ops": ops, "inputs": {"x": meta([1])}, "outputs": [f"x{n - 1}"],
                       "weights": {}}).encode()


def test_a_revoked_tokens_running_upload_and_profile_end_at_the_reload(tmp_path):
    """The token is checked at a call's start; the session-16 fix ended a revoked token's Sessions only: its
    UploadWeights mid-weight went on to the idle timeout (300 s) and its ProfileGraph to its end. Now the reload
    (SIGHUP) ends both UNAUTHENTICATED at once, the profile stops computing, and bob's upload goes on."""
    srv, path = _server(tmp_path, profile_cpu_s=1000.0, profile_cpu_share=10.0)

    async def attack(addr):
        async with grpc.aio.insecure_channel(addr) as ch:
            m = _methods(ch)
            data = os.urandom(2 << 20)
            sha = hashlib.sha256(data).hexdigest()
            uploads = {}
            for who in (ALICE, BOB):
                c = m["UploadWeights"](metadata=_md(who))
                await c.write(pb.UploadWeightsRequest(header=pb.UploadHeader()))
                await c.write(pb.UploadWeightsRequest(chunk=pb.WeightChunk(
                    sha256=sha, dtype="uint8", shape=[len(data)], offset=0, total_bytes=len(data),
                    data=data[: 1 << 20])))
                uploads[who] = c
            profile = ch.unary_unary(SVC + "ProfileGraph", request_serializer=pb.ProfileGraphRequest.SerializeToString,
                                     response_deserializer=pb.ProfileGraphResponse.FromString)(
                pb.ProfileGraphRequest(slice_spec_json=_chain(200), iterations=50, warmup=0), metadata=_md(ALICE),
                timeout=300)
            rt = srv.runtime
            deadline = time.monotonic() + 60
            while rt.scheduler.stats().tasks_run < 3 and time.monotonic() < deadline:  # the profile runs
                await asyncio.sleep(0.1)
            path.write_text(json.dumps({"tenants": {"bob": {"token": BOB}}}))
            assert await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_reload(rt), srv._loop))
            t0 = time.monotonic()
            up_code, prof_code = await _code(uploads[ALICE], 10), await _code(profile, 10)
            took = time.monotonic() - t0
            ran = rt.scheduler.stats().tasks_run
            await asyncio.sleep(1.0)
            still = rt.scheduler.stats().tasks_run - ran
            c = uploads[BOB]
            await c.write(pb.UploadWeightsRequest(chunk=pb.WeightChunk(
                sha256=sha, dtype="uint8", shape=[len(data)], offset=1 << 20, total_bytes=len(data),
                data=data[1 << 20:])))
            await c.done_writing()
            done = await asyncio.wait_for(c, 30)
            return up_code, prof_code, took, still, done

    with srv:
        up_code, prof_code, took, still, done = asyncio.run(attack(srv.address))
        assert (up_code, prof_code) == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED)
        assert took < 5
        assert still <= 1  # the profile stopped at its next op boundary
        assert [w.nbytes for w in done.weights] == [2 << 20]
        assert srv.runtime.calls.open_calls() == 0


async def _reload(runtime) -> bool:
    return runtime.reload_tokens()


def _placed_spec(device, pin_memory=False):
    """A slice whose factory op names its own device: ``new_full(x, [64, 64], 1.0, device=...)``."""
    op = {"name": "y", "target": "aten.new_full.default", "args": [{"t": "x"}, [64, 64], 1.0],
          "kwargs": {"device": device, "pin_memory": pin_memory}, "outputs": [meta([64, 64])]}
    return json.dumps({"version": 1, "ops": [op], "inputs": {"x": meta([1])}, "outputs": ["y"],
                       "weights": {}}).encode()


def test_every_allowlisted_ops_device_and_pin_memory_are_keyword_only():
    """The placement check reads ``device`` / ``pin_memory`` from an op's kwargs only: true while no allowlisted
    op takes them positionally (a new op on the allowlist that does fails here)."""
    from modelgraph.allowlist import ALLOWED_OPS, resolve

    positional = [(t, a.name) for t in sorted(ALLOWED_OPS) for a in resolve(t)._schema.arguments
                  if ("Device" in str(a.type) or a.name in ("device", "pin_memory")) and not a.kwarg_only]
    assert positional == []


@pytest.mark.parametrize("device,pin", [("cuda:1", False), ("cpu", False), ("meta", False),
                                        ({"device": None}, True), (["cpu"], False)])
def test_a_slice_cannot_place_its_tensors_on_a_device_of_its_choosing(tmp_path, device, pin):
    """review17 F2: a plain string passed the argument vocabulary, and validation forced ``device=meta``, so
    ``new_full(..., device="cuda:1")`` was accepted and ran with the client's device (on a GPU host: a GPU the
    operator did not choose; ``"cpu"`` beside ``--device cuda``: host memory). Now INVALID_ARGUMENT, naming the
    op; the executing side's device (``{"device": null}``) still profiles, and the server serves on."""
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg

    srv, _ = _server(tmp_path)
    with srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)

        def profile(spec):
            return stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1, warmup=0),
                                     metadata=_md(ALICE), timeout=60)

        with pytest.raises(grpc.RpcError) as e:
            profile(_placed_spec(device, pin))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'y'" in e.value.details() and ("device" in e.value.details() or "pin_memory" in e.value.details())
        assert len(profile(_placed_spec({"device": None})).ops) == 1  # the executing side's device: served
