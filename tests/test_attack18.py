"""Session 18's attacker, from outside: faults found with raw gRPC clients (grpc.aio / grpc, the project's protos,
not our client) and fixed. Each test starts a real server on port 0 and attacks it as a stranger would; each failed
before its fix.

Measured before the fixes (docs/results/attack/session18/): a session's DefineSlice of 2000 ``tril`` ops with
distinct diagonals took ~1 CPU s of validation (each op's meta kernel runs: no two calls are alike), so a 100k-op
slice was ~50 s here (140 s on session 17's machine) of the one validation slot and the GIL, charged to nothing.
"""

from __future__ import annotations

import json
import queue
import time

import grpc
import pytest

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.slice_json import meta, zeros

ALICE, BOB = "alice-secret-123", "bob-secret-4567"


def _md(token):
    return (("authorization", f"Bearer {token}"),)


def _server(tmp_path, **config):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {"alice": {"token": ALICE}, "bob": {"token": BOB}}}))
    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=str(path), **config)
    return ServerThread(config=cfg)


def tril_chain(n: int, distinct: bool = True) -> bytes:
    """A slice of ``n - 1`` ``tril`` ops on an 8 x 8 tensor, each with its own diagonal when ``distinct`` (no two
    meta-kernel calls alike: validation's memo never hits; ~0.5 ms of CPU per op here, 1.4 ms on session 17's)."""
    ops = [zeros("x0", [8, 8])]
    for i in range(1, n):
        ops.append({"name": f"x{i}", "target": "aten.tril.default", "args": [{"t": f"x{i - 1}"}, i if distinct else 1],
                    "kwargs": {}, "outputs": [meta([8, 8])]})
    return json.dumps({"version": 1, "ops": ops, "inputs": {"x": meta([1])}, "outputs": [f"x{n - 1}"],
                       "weights": {}}).encode()


def _define(stub, token, spec: bytes, n_slices: int = 1, timeout: float = 120):
    """Open a session as a raw client and define ``n_slices`` slices of ``spec`` one after another; returns the
    answers to the DefineSlices (SliceDefined / SliceRejected), each with the wall time it took."""
    out = []
    reqs = [pb.SessionRequest(open=pb.OpenSession(model_id="m"))]
    reqs += [pb.SessionRequest(define_slice=pb.DefineSlice(slice_id=f"s{i}", slice_spec_json=spec))
             for i in range(n_slices)]
    q: queue.Queue = queue.Queue()

    def gen():
        while True:
            r = q.get()
            if r is None:
                return
            yield r

    call = stub.Session(gen(), metadata=_md(token), timeout=timeout)
    q.put(reqs[0])
    assert next(call).HasField("opened")
    for r in reqs[1:]:
        t0 = time.perf_counter()
        q.put(r)
        msg = next(call)
        while not (msg.HasField("slice_defined") or msg.HasField("slice_rejected")):
            msg = next(call)
        out.append((msg, time.perf_counter() - t0))
    q.put(None)
    call.cancel()
    return out


def test_a_tenants_slice_validation_cpu_is_bounded_and_others_validate(tmp_path):
    """review17 F5: a slice whose ops' meta-kernel calls all differ costs ~0.5-1.4 ms of validation CPU per op, and
    nothing charged it: 2000 ``tril`` ops were ~1-3 CPU s, 100k ops ~50-140 s of the one validation slot. Now each
    tenant's validations are charged to its slice validation budget (``--slice-cpu-s``): one that spends it stops
    mid-way RESOURCE_EXHAUSTED, the next is refused at once, and another tenant's slice still validates."""
    srv = _server(tmp_path, slice_cpu_s=0.2, slice_cpu_share=0.01)
    with srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        big = tril_chain(4000)  # ~2 CPU s unbounded here
        (first, t1), (second, t2) = _define(stub, ALICE, big, n_slices=2)
        assert first.HasField("slice_rejected"), first
        assert first.slice_rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "slice validation stopped" in first.slice_rejected.message
        assert "tenant 'alice'" in first.slice_rejected.message
        assert t1 < 1.0, t1  # stopped near 0.2 CPU s, not at ~2
        assert second.HasField("slice_rejected") and "slice validation refused" in second.slice_rejected.message
        assert t2 < 0.5, t2
        (ok, _), = _define(stub, BOB, tril_chain(50))
        assert ok.HasField("slice_defined"), ok
        assert srv.runtime.slice_budget.charged_s["alice"] < 0.6


def test_a_calls_token_is_hashed_once(tmp_path, monkeypatch):
    """The authentication interceptor hashed the bearer token, then the call gate's admission hashed it twice more
    (its tenant, then its digest for revocation) and the servicer once more (its principal): 4 sha256 and 3 reads of
    the call's metadata per call. Now the interceptor records the caller for the call's task
    (``edge_server.auth.remember_caller``; grpc.aio runs the interceptor and the handler in one task) and the others
    read it: one hash per call. A Session's token digest (for revocation) and a call ended by a reload still work."""
    import edge_server.auth as auth

    hashed = []
    real = auth.token_digest
    monkeypatch.setattr(auth, "token_digest", lambda t: hashed.append(t) or real(t))
    srv = _server(tmp_path)
    with srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        stub.Hello(pb.HelloRequest(), metadata=_md(ALICE), timeout=30)  # warm
        hashed.clear()
        for token in (ALICE, BOB, ALICE):
            assert stub.Hello(pb.HelloRequest(), metadata=_md(token), timeout=30).server_version
        assert len(hashed) == 3, len(hashed)
        with pytest.raises(grpc.RpcError) as e:  # another tenant's name in the message: still refused
            stub.Hello(pb.HelloRequest(tenant="bob"), metadata=_md(ALICE), timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        (ok, _), = _define(stub, BOB, tril_chain(3))
        assert ok.HasField("slice_defined")
        end = time.monotonic() + 10
        while srv.runtime.calls.open_calls() and time.monotonic() < end:  # the cancelled Session's call leaves
            time.sleep(0.01)
        assert srv.runtime.calls.open_calls() == 0
