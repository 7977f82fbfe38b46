"""break39: the staging area's charges, attacked against a real server (in-process ``ServerThread`` on loopback
port 0) with raw gRPC streams of the protos, as an attacker speaks them.

F2: since break37 an upload in progress counted 8 KiB (``MIN_WEIGHT_CHARGE``) in the server-wide staging area, about
twelve times the memory it holds, so two tenants, each within its half of the area, filled it with half-sent 8-byte
weights (``--memory-mb 1024``: 16,384 of them, 1.4 MB of messages in 2.6 s) and every other tenant's uploads and
request tensors were refused "staging area full". The area is now charged ``MIN_AREA_CHARGE`` (what the bookkeeping
holds), the tenant's staging keeps its 8 KiB floor.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import grpc
import pytest
import torch

from edge_server.config import MiB, ServerConfig
from edge_server.tensor_codec import encode_weight_chunks
from edge_server.testing import ServerThread
from edge_server.weight_store import MIN_WEIGHT_CHARGE
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from tests.raw_stream import RawStream

TIMEOUT = 30
TOKENS = {"m1": "m1-token-break39-000", "m2": "m2-token-break39-000", "victim": "victim-token-break39-0"}
FIRST_CHUNK = next(iter(encode_weight_chunks("0" * 64, torch.tensor([1.0, 2.0]), 4)))
"""The first 4 of an 8-byte float32 weight's bytes (its sha256 replaced for each upload)."""


def _tokens(path, quotas: dict | None = None) -> str:
    quotas = quotas or {}
    tenants = {n: {"token": t, **({"quota": quotas[n]} if n in quotas else {})} for n, t in TOKENS.items()}
    path.write_text(json.dumps({"tenants": tenants}))
    return str(path)


def _wait(pred, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"{what} not reached in {timeout} s"
        time.sleep(0.02)


_Stream = RawStream


def _stub(srv: ServerThread, tenant: str):
    from ue_client import wire

    ch = wire.channel(srv.address, token=TOKENS[tenant])
    return ch, pb_grpc.EdgeServiceStub(ch)


def _half_uploads(stub, n: int) -> _Stream:
    """An UploadWeights stream that begins ``n`` fresh 8-byte weights and finishes none."""
    s = _Stream(stub.UploadWeights, pb.UploadWeightsRequest(header=pb.UploadHeader()))
    for _ in range(n):
        c = pb.WeightChunk()
        c.CopyFrom(FIRST_CHUNK)
        c.sha256 = secrets.token_hex(32)
        s.send(pb.UploadWeightsRequest(chunk=c))
    return s


def test_two_tenants_half_uploads_leave_room_for_a_third(tmp_path) -> None:
    """F2: a 2 MiB staging area, each tenant at most half of it (1 MiB: 128 uploads at the 8 KiB floor). Two tenants
    each begin as many 8-byte uploads as their limit takes; a third tenant's 64 KiB weight is still stored (before:
    the two held 2 x 128 x 8 KiB, the whole area, and it was refused "staging area full")."""
    from edge_server.weight_store import MIN_AREA_CHARGE

    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=2 * MiB, threads=1, auth_tokens_file=_tokens(tmp_path / "t"))
    per_tenant = MiB // MIN_WEIGHT_CHARGE
    with ServerThread(config=cfg) as srv:
        store = srv.runtime.store
        chans, streams = [], []
        for t in ("m1", "m2"):
            ch, stub = _stub(srv, t)
            chans.append(ch)
            streams.append(_half_uploads(stub, per_tenant))
        _wait(lambda: all(store.stats(t).staging_bytes == MiB for t in ("m1", "m2")), "both tenants at their limit")
        assert not any(s.done.is_set() for s in streams), [s.error for s in streams]
        ch, stub = _stub(srv, "victim")
        w = torch.arange(16384, dtype=torch.float32)
        sha = hashlib.sha256(w.numpy().tobytes()).hexdigest()
        msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader())]
        msgs += [pb.UploadWeightsRequest(chunk=c) for c in encode_weight_chunks(sha, w, 1 << 15)]
        r = stub.UploadWeights(iter(msgs), timeout=TIMEOUT)
        assert [x.sha256 for x in r.weights] == [sha]
        assert store.staging.used == 2 * per_tenant * MIN_AREA_CHARGE
        for s in streams:
            s.end()
        _wait(lambda: store.staging.used == 0 and not any(store.stats(t).staging_bytes for t in TOKENS), "given back")
        for c in [*chans, ch]:
            c.close()


def _slice(n_inputs: int, shape: list[int]) -> bytes:
    """A slice of ``n_inputs`` float32 inputs of ``shape``; its one op reads only ``x0``."""
    return json.dumps({
        "version": 1,
        "inputs": {f"x{i}": {"shape": shape, "dtype": "float32"} for i in range(n_inputs)},
        "weights": {},
        "ops": [{"name": "r", "target": "aten.relu.default", "args": [{"t": "x0"}], "kwargs": {},
                 "outputs": [{"shape": shape, "dtype": "float32"}]}],
        "outputs": ["r"],
    }).encode()


def _tensor(rid: int, name: str, shape: list[int]) -> pb.SessionRequest:
    n = 4
    for d in shape:
        n *= d
    meta = pb.TensorMeta(name=name, dtype="float32", shape=shape)
    return pb.SessionRequest(tensor=pb.TensorChunk(request_id=rid, meta=meta, total_bytes=n, data=bytes(n)))


@pytest.mark.parametrize("shape", [[1], [0]], ids=["4-bytes", "empty"])
def test_tiny_request_tensors_are_charged_their_bookkeeping(tmp_path, shape) -> None:
    """F1: a request's cut tensors were charged their bytes only (4, or 0 for an empty one), while each holds its
    assembler and then its tensor (0.9 / 1.5 KiB): 16 requests of 20,000 such inputs took a ``--memory-mb 1024``
    server +500 MiB, charged 1.3 MB. Now each counts MIN_WEIGHT_CHARGE in its tenant's staging and MIN_AREA_CHARGE more
    in the area: with a 1 MiB tenant limit the 129th fails the request RESOURCE_EXHAUSTED (before: all 299 were
    taken), everything comes back, and the session goes on."""
    from edge_server.weight_store import MIN_AREA_CHARGE

    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=2 * MiB, threads=1, auth_tokens_file=_tokens(tmp_path / "t"),
                       data_port=None)
    nbytes = 4 * (shape[0] if shape else 1)
    with ServerThread(config=cfg) as srv:
        store = srv.runtime.store
        ch, stub = _stub(srv, "m1")
        open_ = pb.OpenSession(model_id="m", slice_id="many", slice_spec_json=_slice(300, shape))
        s = _Stream(stub.Session, pb.SessionRequest(open=open_))
        s.send(pb.SessionRequest(define_slice=pb.DefineSlice(slice_id="one", slice_spec_json=_slice(1, [1]))))
        s.send(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1, slice_id="many")))
        for i in range(1, 101):
            s.send(_tensor(1, f"x{i}", shape))
        _wait(lambda: store.stats("m1").staging_bytes == 100 * MIN_WEIGHT_CHARGE or s.done.is_set(),
              "100 tensors charged MIN_WEIGHT_CHARGE each")
        assert store.staging.used == 100 * (MIN_AREA_CHARGE + nbytes)
        for i in range(101, 300):
            s.send(_tensor(1, f"x{i}", shape))
        failed = lambda: [a.request_failed for a in s.answers if a.HasField("request_failed")]
        _wait(lambda: failed() or s.done.is_set(), "the request refused")
        assert failed()[0].request_id == 1 and failed()[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "staging limit" in failed()[0].message, failed()[0].message
        _wait(lambda: store.staging.used == 0 and store.stats("m1").staging_bytes == 0, "staging given back")
        # the session goes on: a request of the one-input slice is answered
        s.send(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=2, slice_id="one")))
        s.send(_tensor(2, "x0", [1]))
        _wait(lambda: any(a.HasField("request_done") for a in s.answers) or s.done.is_set(), "request 2 done")
        assert not s.done.is_set(), s.error
        s.end()
        ch.close()
        _wait(lambda: store.staging.used == 0 and store.stats("m1").staging_bytes == 0, "staging given back")
