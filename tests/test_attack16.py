"""Session 16's attacker, from outside: faults found with raw gRPC clients (not our client) and fixed.

Each test starts a real server on port 0 and attacks it as a stranger would; each failed before its fix.
"""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from edge_server.config import MiB, ServerConfig
from edge_server.op_budget import measure_slow_gemm_rates
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.slice_json import meta as _meta
from tests.slice_json import zeros as _zeros


def _op(name, target, args, outs):
    return {"name": name, "target": target, "args": args, "kwargs": {}, "outputs": outs}


def _spec(ops, output):
    return json.dumps({"version": 1, "ops": ops, "inputs": {"x": _meta([1])}, "outputs": [output],
                       "weights": {}}).encode()


def _mm(dtype, n):
    return _spec([_zeros("a", [n, n], dtype), _zeros("b", [n, n], dtype),
                  _op("y", "aten.mm.default", [{"t": "a"}, {"t": "b"}], [_meta([n, n], dtype)])], "y")


def _conv(dtype, c, hw):
    return _spec([_zeros("a", [1, c, hw, hw], dtype), _zeros("w", [c, c, 3, 3], dtype),
                  _op("y", "aten.conv2d.default", [{"t": "a"}, {"t": "w"}, None, [1, 1], [1, 1]],
                      [_meta([1, c, hw, hw], dtype)])], "y")


@pytest.fixture(scope="module")
def server():
    with ServerThread(config=ServerConfig(cache_bytes=8 * MiB, staging_bytes=8 * MiB, threads=1)) as srv:
        yield srv


def _profile(srv, spec):
    stub = pbg.EdgeServiceStub(grpc.insecure_channel(srv.address))
    return stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1, warmup=0), timeout=120)


# Measured here (one thread): float16 mm 1024 x 1024 3.8 s, float16 conv 64 ch 128 px 1.4 s, counted as float32's
# 2.1 / 1.2 GFLOP (~25 / ~15 ms of the 2 s budget); at the budget's edge such an op runs for minutes.
SLOW_HALF = {"mm_float16": _mm("float16", 1024), "conv_float16": _conv("float16", 64, 128)}


@pytest.mark.parametrize("case", sorted(SLOW_HALF))
def test_half_precision_gemms_without_a_fast_kernel_are_costed_as_they_run(server, case):
    """torch's CPU float16 matmul and convolution have no vectorised kernel here (90-160x float32's time per
    FLOP), and the op budget counted their FLOPs as float32's: a 0.7 KB slice held the compute worker, which
    yields only at op boundaries, for seconds (minutes at the budget's edge). Now RESOURCE_EXHAUSTED naming the
    time budget before anything runs, on a server that measured float16 slow at start."""
    rt = server.runtime
    if "float16" not in rt.op_limits.slow_gemm_dtypes:
        pytest.skip("float16 matmul/conv are vectorised on this CPU")
    ran_before = rt.scheduler.stats().tasks_run
    with pytest.raises(grpc.RpcError) as e:
        _profile(server, SLOW_HALF[case])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "time budget" in e.value.details() and "float16" in e.value.details()
    assert rt.scheduler.stats().tasks_run == ran_before  # refused before any step ran


def test_small_half_gemms_and_fast_bfloat16_still_run(server):
    """What an ordinary half-precision model does still runs: a small float16 matmul, and the same large products
    in a dtype the server measured fast (bfloat16 has oneDNN kernels on an AVX512-BF16 CPU)."""
    r = _profile(server, _mm("float16", 128))
    assert [o.name for o in r.ops] == ["a", "b", "y"]
    if "bfloat16" not in server.runtime.op_limits.slow_gemm_dtypes:
        for spec in (_mm("bfloat16", 1024), _conv("bfloat16", 64, 128)):
            assert _profile(server, spec).ops


def test_slow_dtypes_are_measured_on_the_cpu_only():
    """The measurement names only half-precision dtypes, and none for a CUDA device (fast kernels there)."""
    rates = measure_slow_gemm_rates(torch.device("cpu"))
    assert {r[0] for r in rates} <= {"float16", "bfloat16"} and all(r[1] > 0 and r[2] > 0 for r in rates)
    assert measure_slow_gemm_rates(torch.device("cuda")) == ()


# ---- error answers waiting in the tarpit held their requests ---------------------------------------------------
def _rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


@pytest.mark.parametrize("who", ["stranger_without_a_token", "tenant_with_a_bad_request"])
def test_error_answers_waiting_in_the_tarpit_hold_no_request(tmp_path, who):
    """A refused unary call waits in the tarpit for its caller's slot; grpc's unary path kept the call's request
    (up to the 8 MiB message limit) until the answer went, and so did the refusal's own frames: 250 calls of 7 MiB
    spaced 20 ms apart took the server from 361 to 1225 MiB RSS from a stranger without a token, 1419 MiB from a
    tenant's failing QueryWeights (420 / 551 now; docs/results/attack/session16/tarpit_memory_repro.py). Now the
    refusal reads and drops the request before it waits. 32 calls of 4 MiB, the tarpit's burst spent at once."""
    import time

    from edge_server.attacks import serve_subprocess

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tenants": {"alice": {"token": "alice-secret-123"}}}))
    proc, addr = serve_subprocess("--auth-tokens", str(tokens), "--threads", "1", "--tarpit-burst", "1",
                                  "--tarpit-rate", "0.5")
    ch = grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 16 << 20)])
    try:
        stub = pbg.EdgeServiceStub(ch)
        assert stub.Hello(pb.HelloRequest(), metadata=[("authorization", "Bearer alice-secret-123")], timeout=30)
        before = _rss_mib(proc.pid)
        body = "x" * (4 << 20)
        futs = []
        for _ in range(32):
            if who == "stranger_without_a_token":
                futs.append(stub.Hello.future(pb.HelloRequest(client_version=body), timeout=120))
            else:
                futs.append(stub.QueryWeights.future(pb.QueryWeightsRequest(sha256=["zz" + body]), timeout=120,
                                                     metadata=[("authorization", "Bearer alice-secret-123")]))
            time.sleep(0.05)
        # at 0.5 answers per s past a burst of 1, most calls are still waiting; poll until every one has arrived (the
        # second answer comes 2 s after the first, the 32 calls are sent in ~1.6 s)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(f.done() for f in futs) < 2:
            time.sleep(0.2)
        time.sleep(1.0)
        waiting = sum(not f.done() for f in futs)
        grown = _rss_mib(proc.pid) - before
        assert waiting >= 16, f"only {waiting} calls still waiting"
        assert grown < 48, f"RSS grew {grown:.0f} MiB with {waiting} refused calls of 4 MiB waiting"
        for f in futs:
            f.cancel()
        assert stub.Hello(pb.HelloRequest(), metadata=[("authorization", "Bearer alice-secret-123")], timeout=30)
    finally:
        ch.close()
        proc.terminate()
        proc.wait()


# ---- a revoked token's open session ------------------------------------------------------------------------------
def test_a_session_whose_token_is_revoked_ends_at_the_reload(tmp_path):
    """The bearer token is checked at each call's start; a Session stream lives for hours. A tokens file reloaded
    (SIGHUP) without alice's token left her open session running requests and taking weights. Now the reload ends
    it with UNAUTHENTICATED, and bob's session, whose token stays, goes on."""
    import queue
    import threading

    tokens = tmp_path / "tokens.json"
    alice, bob = "alice-secret-123", "bob-secret-4567"
    tokens.write_text(json.dumps({"tenants": {"alice": {"token": alice}, "bob": {"token": bob}}}))
    with ServerThread(config=ServerConfig(cache_bytes=8 * MiB, staging_bytes=8 * MiB,
                                          auth_tokens_file=str(tokens))) as srv:
        ch = grpc.insecure_channel(srv.address)
        stub = pbg.EdgeServiceStub(ch)

        def open_session(token):
            q: queue.Queue = queue.Queue()
            q.put(pb.SessionRequest(open=pb.OpenSession(model_id="m")))
            responses = stub.Session(iter(q.get, None), metadata=[("authorization", f"Bearer {token}")], timeout=60)
            assert next(responses).HasField("opened")
            return q, responses

        qa, ra = open_session(alice)
        qb, rb = open_session(bob)
        ended: list = []
        t = threading.Thread(target=lambda: ended.append(_end_code(ra)), daemon=True)
        t.start()
        tokens.write_text(json.dumps({"tenants": {"alice": {"token": "alice-new-token-890"}, "bob": {"token": bob}}}))
        assert srv.call(_reload(srv.runtime))
        t.join(30)
        assert ended == [grpc.StatusCode.UNAUTHENTICATED]
        assert len(srv.runtime.sessions.sessions) == 1  # bob's
        qb.put(pb.SessionRequest(close=pb.CloseSession()))
        qb.put(None)
        assert _end_code(rb) == grpc.StatusCode.OK
        qa.put(None)
        ch.close()


def _end_code(responses) -> grpc.StatusCode:
    try:
        for _ in responses:
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _reload(runtime) -> bool:
    return runtime.reload_tokens()
