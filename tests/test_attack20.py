"""Session 20's attacker (bound20): what strangers' calls make the server hold while their requests are received and
decoded, and what the heap keeps after them. Real servers on port 0, raw gRPC clients; asserts on the server's own
accounting (its memory budget, its gate's counters), not on RSS (the probe, docs/results/attack/session20/, measures
RSS). Each test failed before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import grpc
import pytest

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack18 import ALICE, BOB, _md

OPTS = [("grpc.max_send_message_length", 16 * MiB), ("grpc.max_receive_message_length", 16 * MiB)]


def _server(tmp_path, **config) -> ServerThread:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {"alice": {"token": ALICE}, "bob": {"token": BOB}}}))
    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=str(path), **config)
    return ServerThread(config=cfg)


def _nothing_held(srv: ServerThread) -> None:
    """The server's memory budget holds nothing (within 5 s: a call's hold is given back when its handler ends, just
    after its answer went)."""
    deadline = time.monotonic() + 5
    while srv.runtime.memory.stats().reserved_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.runtime.memory.stats().reserved_bytes == 0


def test_a_big_unary_request_is_held_in_the_memory_budget_and_refused_when_it_does_not_fit(tmp_path):
    """review19 F4 / bound20: a decoded request was not in the memory budget (only what its method made of it), so
    requests waiting for the validation slot held ~100 MiB beside it. Now a request of 64 KiB or more is held in the
    budget from its decoding to its handler's end: a 3 MiB Hello under a budget whose per-client share is 2 MiB is
    refused RESOURCE_EXHAUSTED naming the request (it was answered OK), a small Hello still passes, and nothing is
    held after."""
    with _server(tmp_path) as srv, grpc.insecure_channel(srv.address, options=OPTS) as ch:
        mem = srv.runtime.memory
        mem.limit_bytes = 4 * MiB  # one client may hold half: 2 MiB
        stub = pbg.EdgeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Hello(pb.HelloRequest(client_version="x" * (3 * MiB)), metadata=_md(ALICE), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "Hello's request (3.0 MiB received, held while it is processed)" in e.value.details()
        assert "working memory" in e.value.details()
        assert stub.Hello(pb.HelloRequest(client_version="small"), metadata=_md(BOB), timeout=30).server_version
        assert srv.runtime.calls.hold_refused == 1
        assert mem.stats().reserved_bytes == 0 and mem.stats().refused == 1


def test_a_profile_graphs_request_is_held_while_its_method_runs_and_given_back_after(tmp_path):
    """The hold lasts while the handler holds the request: seen from inside ProfileGraph (the runtime's own method,
    observed and then let run), alice's budget holds her request's wire bytes on top of the spec copy the method
    reserves itself; after the answer, nothing."""
    with _server(tmp_path) as srv, grpc.insecure_channel(srv.address, options=OPTS) as ch:
        rt = srv.runtime
        seen = []
        profile = rt.profile

        async def observed(spec_json, *a, **kw):
            seen.append(rt.memory.held_by("alice"))
            return await profile(spec_json, *a, **kw)

        rt.profile = observed
        spec = b" " * (1 * MiB) + json.dumps({"version": 1, "ops": [], "inputs": {}, "outputs": [],
                                              "weights": {}}).encode()
        req = pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1)
        with contextlib.suppress(grpc.RpcError):  # what the spec makes of it does not matter here
            pbg.EdgeServiceStub(ch).ProfileGraph(req, metadata=_md(ALICE), timeout=60)
        assert seen and seen[0] >= req.ByteSize(), (seen, req.ByteSize())
        _nothing_held(srv)


def test_a_sessions_big_open_session_is_held_and_refused_before_its_slice_is_looked_at(tmp_path):
    """The same for a stream's first message: a Session's 4 MiB OpenSession under a budget of 4 MiB (2 MiB a client)
    is refused RESOURCE_EXHAUSTED naming the request before its slice is parsed (before: INVALID_ARGUMENT from the
    slice spec, after decoding and holding it outside the budget); nothing held after."""
    with _server(tmp_path) as srv, grpc.insecure_channel(srv.address, options=OPTS) as ch:
        mem = srv.runtime.memory
        mem.limit_bytes = 4 * MiB
        body = pb.SessionRequest(open=pb.OpenSession(model_id="m", slice_id="s", slice_spec_json=b"x" * (4 * MiB)))
        with pytest.raises(grpc.RpcError) as e:
            for _ in pbg.EdgeServiceStub(ch).Session(iter([body]), metadata=_md(ALICE), timeout=30):
                pass
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "Session's request (4.0 MiB received" in e.value.details()
        assert mem.stats().reserved_bytes == 0 and srv.runtime.calls.hold_refused == 1


def test_the_server_wide_reading_slots_bound_reads_across_callers():
    """``--max-reading-calls`` bounds one caller's reads: 64 tenants' 6.45 MiB ProfileGraphs were all received at
    once (+862 MiB of server RSS over a 722 MiB budget, session 20). The server-wide slots (``server_reading``):
    with 2, a third caller's read waits until one of the two reading gives its slot back, whatever its key."""
    from edge_server.calls import CallGate

    async def run():
        gate = CallGate(server_reading=2)
        calls = [gate.enter(f"tenant:{k}") for k in "abc"]
        assert await gate.reading(calls[0]) and await gate.reading(calls[1])
        third = asyncio.ensure_future(gate.reading(calls[2]))
        await asyncio.sleep(0.05)
        assert not third.done()
        gate.read_done(calls[0])
        assert await asyncio.wait_for(third, 1.0)
        gate.leave(calls[1])  # leaving gives the slot back too
        fourth = gate.enter("tenant:d")
        assert await asyncio.wait_for(gate.reading(fourth), 1.0)
        for c in (calls[0], calls[2], fourth):
            gate.leave(c)
        assert gate.server_free == 2

    asyncio.run(run())


def test_max_reading_mb_takes_the_reading_slots_off_the_budget_and_bounds_a_servers_reads(tmp_path):
    """``max_reading_bytes`` makes ``max_reading_bytes // max_message_bytes`` server-wide slots in the server's gate
    and takes slots x message limit x ``RECEIVE_COPIES`` off the budget for work in flight under ``--memory-mb``, so
    what is received and what is held fit the cap together."""
    from edge_server.calls import RECEIVE_COPIES
    from edge_server.sizing import inflight_budget, reading_reserve, reading_slots

    cfg = ServerConfig(memory_bytes=2048 * MiB, cache_bytes=16 * MiB, staging_bytes=16 * MiB,
                       max_reading_bytes=32 * MiB)
    assert reading_slots(cfg) == 4 and reading_reserve(cfg) == 4 * cfg.max_message_bytes * RECEIVE_COPIES
    plain = ServerConfig(memory_bytes=2048 * MiB, cache_bytes=16 * MiB, staging_bytes=16 * MiB,
                         max_reading_bytes=0)  # (unset: sized from the budget since session 21)
    assert abs(inflight_budget(plain) - inflight_budget(cfg) - reading_reserve(cfg)) < 16 * MiB  # RSS moves a bit
    with _server(tmp_path, max_reading_bytes=16 * MiB) as srv, grpc.insecure_channel(srv.address) as ch:
        assert srv.runtime.calls.server_reading == 2
        assert pbg.EdgeServiceStub(ch).Hello(pb.HelloRequest(), metadata=_md(ALICE), timeout=30).server_version


def test_max_reading_mb_without_the_call_gate_is_refused_by_the_cli():
    """As ``--max-reading-calls``: the bound lives in the call gate; without it, a one-line error, exit 2."""
    import subprocess
    import sys

    from tests.test_server_cli import ENV, ROOT

    r = subprocess.run([sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--max-reading-mb", "32",
                        "--max-calls-per-caller", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-reading-mb needs the call gate" in lines[0], r.stderr


def test_the_trimmer_gives_freed_heap_back_after_enough_big_buffers():
    """+92 MiB of RSS stayed after 48 refused 4 MiB OpenSessions one after another (glibc keeps freed heap; one
    ``malloc_trim(0)``: +2 MiB). The trimmer trims once ``threshold_bytes`` of big buffers were released, on its own
    thread, and not before."""
    from edge_server.memory import Trimmer

    t = Trimmer(threshold_bytes=8 * MiB, min_interval_s=0.0)
    try:
        if t._trim is None:
            pytest.skip("no malloc_trim in this C library")
        t.note(4 * MiB)
        time.sleep(0.1)
        assert t.trims == 0
        t.note(4 * MiB)
        deadline = time.monotonic() + 5
        while t.trims == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.trims == 1
    finally:
        t.close()


def test_big_requests_held_by_the_gate_are_noted_to_the_trimmer(tmp_path):
    """The gate tells the server's trimmer of each big held request it drops (the 48 OpenSessions' case): after
    five 4 MiB Sessions refused once read, the trimmer has trimmed (its threshold is 16 MiB)."""
    with _server(tmp_path) as srv, grpc.insecure_channel(srv.address, options=OPTS) as ch:
        trimmer = srv.runtime.bounds.trimmer
        if trimmer._trim is None:
            pytest.skip("no malloc_trim in this C library")
        body = pb.SessionRequest(open=pb.OpenSession(model_id="m", slice_id="s", slice_spec_json=b"x" * (4 * MiB)))
        for _ in range(5):
            with pytest.raises(grpc.RpcError):
                for _ in pbg.EdgeServiceStub(ch).Session(iter([body]), metadata=_md(ALICE), timeout=30):
                    pass
        deadline = time.monotonic() + 5
        while trimmer.trims == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert trimmer.trims >= 1
        _nothing_held(srv)


def test_a_validation_stopped_by_its_budget_leaves_no_cyclic_garbage(tmp_path):
    """A validation stopped mid-way (its tenant's ProfileGraph budget spent) left its parsed spec and meta values in
    reference cycles through the exception's traceback: ~456k objects (~80 MiB of RSS for a 6.45 MiB spec) per
    stopped validation, freed only by a full collection (session 20: 16 tenants' stopped validations, +1100-1200 MiB
    of server RSS beside a 722 MiB budget). ``Bounds.compile`` now drops the traceback: after a stopped validation of
    a 3000-op spec, a full collection finds almost nothing (it found tens of thousands of objects)."""
    import gc

    from tests.test_attack18 import tril_chain

    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {"alice": {"token": ALICE, "quota": {"profile_cpu_s": 0.05,
                                                                                "profile_cpu_share": 1.0}}}}))
    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=str(path))
    spec = tril_chain(3000)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address, options=OPTS) as ch:
        stub = pbg.EdgeServiceStub(ch)
        gc.collect()
        with pytest.raises(grpc.RpcError) as e:
            stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1), metadata=_md(ALICE),
                              timeout=60)
        assert e.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "ProfileGraph" in e.value.details()
        _nothing_held(srv)
        time.sleep(0.2)
        found = gc.collect()
        assert found < 3000, found
