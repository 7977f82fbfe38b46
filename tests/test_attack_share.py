"""Holes found by attacking the share/sandbox/validation-memo change from outside (real server on port 0,
hand-written slices against the protos): each test is the attack, and fails on the code before its fix."""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from edge_server.config import ServerConfig
from edge_server.tensor_codec import encode_tensor_chunks
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc

TIMEOUT = 30
F43 = {"shape": [4, 3], "dtype": "float32"}
F23 = {"shape": [2, 3], "dtype": "float32"}


def _op(name: str, target: str, args: list, outs: list, multi: bool = False) -> dict:
    return {"name": name, "target": target, "args": args, "kwargs": {}, "outputs": outs, "multi": multi}


def _slice(ops: list, outputs: list[str]) -> bytes:
    return json.dumps({"version": 1, "model_hash": "m", "ops": ops, "inputs": {"x": F43}, "outputs": outputs,
                       "weights": {}}).encode()


@pytest.fixture(scope="module", params=[0, 1], ids=["in-process", "profile-child"])
def stub(request):
    cfg = ServerConfig(threads=1, profile_workers=request.param)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        yield pb_grpc.EdgeServiceStub(ch)


def _open_and_run(stub, raw: bytes) -> list:
    """Open a session on ``raw`` and run one request on a random x: the answers, or the RpcError."""
    msgs = [pb.SessionRequest(open=pb.OpenSession(tenant="t", model_id="m", slice_spec_json=raw)),
            pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1))]
    msgs += [pb.SessionRequest(tensor=c) for c in encode_tensor_chunks(1, "x", torch.randn(4, 3), 1 << 16)]
    out: list = []
    try:
        for r in stub.Session(iter(msgs), timeout=TIMEOUT):
            out.append(r)
            if r.WhichOneof("msg") in ("request_done", "request_failed"):
                break
    except grpc.RpcError as e:
        out.append(e)
    return out


# a split whose list result is declared as one op's tensor output: after a real multi split of the same call
# (the validation memo once keyed calls without ``multi`` and reused the 2-tensor result), and alone (a
# non-tensor result of a used output was skipped, not refused)
NOT_A_TENSOR = {
    "after-multi-twin": [
        _op("a", "aten.split.Tensor", [{"t": "x"}, 2], [F23, F23], multi=True),
        _op("s", "aten.split.Tensor", [{"t": "x"}, 2], [F23, F23]),
    ],
    "alone": [_op("s", "aten.split.Tensor", [{"t": "x"}, 2], [F23])],
}


@pytest.mark.parametrize("case", sorted(NOT_A_TENSOR))
def test_a_list_result_declared_as_one_tensor_is_refused(stub, case: str) -> None:
    raw = _slice(NOT_A_TENSOR[case], ["s"])
    with pytest.raises(grpc.RpcError) as ei:
        stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=raw, iterations=2, warmup=1), timeout=TIMEOUT)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    assert "'s'" in ei.value.details()
    got = _open_and_run(stub, raw)
    assert len(got) == 1 and isinstance(got[0], grpc.RpcError), got  # the open fails: no request runs
    assert got[0].code() == grpc.StatusCode.INVALID_ARGUMENT, got[0].details()
    # the server keeps serving: a correct slice of the same op runs
    ok = _slice([_op("a", "aten.split.Tensor", [{"t": "x"}, 2], [F23, F23], multi=True)], ["a#1"])
    assert _open_and_run(stub, ok)[-1].WhichOneof("msg") == "request_done"


def test_a_profile_refused_for_memory_leaves_the_child_ready_for_the_next() -> None:
    """The child validated a slice and waits for the go; the server's memory budget refuses the run. The
    child must be told (once the go never came, it took the next job's message for it, and that next
    profile, another client's as well, failed with INTERNAL)."""
    import psutil

    rss = psutil.Process().memory_info().rss  # an in-process server's cap covers this test process
    cfg = ServerConfig(threads=1, profile_workers=1, cache_bytes=64 << 20, staging_bytes=64 << 20,
                       memory_bytes=rss + (64 + 64 + 160 << 20))
    # 32 MiB in, 64 MiB at peak: under the whole ~160 MiB budget (the slice compiles), over a client's half
    big = {"shape": [2048, 4096], "dtype": "float32"}
    raw_big = json.dumps({"version": 1, "model_hash": "m", "inputs": {"x": big}, "outputs": ["r"], "weights": {},
                          "ops": [_op("r", "aten.relu.default", [{"t": "x"}], [big])]}).encode()
    raw_small = _slice([_op("r", "aten.relu.default", [{"t": "x"}], [F43])], ["r"])
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as ei:
                stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=raw_big, iterations=1), timeout=TIMEOUT)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value.details()
            assert "one client may hold at most" in ei.value.details()  # the budget refused it, not the compile
            r = stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=raw_small, iterations=2), timeout=TIMEOUT)
            assert r.total_mean_ms > 0
        assert srv.runtime.memory.stats().reserved_bytes == 0
