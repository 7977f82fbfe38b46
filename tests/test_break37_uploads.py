"""break37 F4, attacked again against a real server (in-process ``ServerThread`` on loopback port 0) with raw
gRPC streams of the protos, as an attacker speaks them, and with our own client.

Each upload begun on a stream holds an ``Upload`` (a sha256 hasher, a buffer, the stream's table entry: 0.5-0.7 KiB
measured) but was charged only its declared bytes to its tenant's staging and its received bytes to the server-wide
area: 114,524 first chunks of 8-byte weights on one UploadWeights stream held 74 MiB of a ``--memory-mb 1024``
server, charged ~0.9 MB, and nothing capped how many one stream began. Now an upload in progress counts for at least
``MIN_WEIGHT_CHARGE`` in both (``WeightStore.begin_upload``), given back when it ends, and one stream has at most
``MAX_UPLOADS_IN_PROGRESS`` in progress (RESOURCE_EXHAUSTED beyond, naming the cap). The four refusal tests failed
before the fix (checked against f5d2e9a1's store and tracker: no refusal, and 8 bytes per upload charged to the
tenant's staging, 4 to the area); the client test shows our client unaffected (its diamond cases passed before the
fix too: one upload in progress per stream).
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
from edge_server.uploads import MAX_UPLOADS_IN_PROGRESS, UploadTracker
from edge_server.weight_store import MIN_AREA_CHARGE, MIN_WEIGHT_CHARGE
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from tests.raw_stream import RawStream

TIMEOUT = 30
REFUSED_S = 10
"""How long a test waits for a refusal (they come in well under a second)."""
TENANT = "mallory"
TOKEN = "mallory-token-0037"
FIRST_CHUNK = next(iter(encode_weight_chunks("0" * 64, torch.tensor([1.0, 2.0]), 4)))
"""The first 4 of an 8-byte float32 weight's bytes (its sha256 replaced for each upload)."""


def _first_chunk() -> pb.WeightChunk:
    """The first half of a fresh 8-byte weight: an upload begun and never finished."""
    c = pb.WeightChunk()
    c.CopyFrom(FIRST_CHUNK)
    c.sha256 = secrets.token_hex(32)
    return c


def _wait(pred, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"{what} not reached in {timeout} s"
        time.sleep(0.02)


_Stream = RawStream


def _upload_stream(stub) -> _Stream:
    return _Stream(stub.UploadWeights, pb.UploadWeightsRequest(header=pb.UploadHeader(tenant=TENANT)))


def _staging(srv: ServerThread) -> tuple[int, int]:
    """(the server-wide staging area used, every tenant's staging charged), bytes."""
    store = srv.runtime.store
    return store.staging.used, sum(store.stats(t).staging_bytes for t in store.tenants())


def _begin(stream: _Stream, n: int, wrap=lambda c: pb.UploadWeightsRequest(chunk=c)) -> None:
    for _ in range(n):
        stream.send(wrap(_first_chunk()))


def _wide() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Four 1 MiB linear layers: each weight spans several chunks (our client's smallest is 256 KiB), so its
    upload can be interrupted by a more urgent one (the zoo's weights all fit one chunk)."""
    torch.manual_seed(37)
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(512, 512), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval(), (torch.randn(2, 512),)


def _client_works(srv: ServerThread, model: str = "diamond", **opts) -> None:
    """Our own client uploads ``model``'s weights (the zoo's diamond, or :func:`_wide`) and runs it remotely,
    exactly."""
    from modelgraph import zoo
    from ue_client import CoinferClient
    from ue_client.options import ClientOptions
    from ue_client.verify import max_abs_diff

    o = ClientOptions(policy="offload", link=None, fallback=False, **opts)
    args = (zoo.spec(model),) if model == "diamond" else _wide()
    with CoinferClient(*args, server=srv.address, options=o) as c:
        x = c.example_inputs
        assert max_abs_diff(c(*x), c.reference(*x)) == 0.0
        assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report


@pytest.fixture()
def served():
    """A server without tokens (the report's: no per-tenant staging limit, any tenant name), a 16 MiB cache and
    its default 64 MiB staging area: the per-stream cap is what stops one stream."""
    with ServerThread(config=ServerConfig(cache_bytes=16 * MiB, threads=1)) as srv:
        yield srv


def test_half_received_uploads_on_one_stream_are_charged_and_stop_at_the_cap(served) -> None:
    """(a) First chunks of fresh 8-byte weights on one UploadWeights stream: each in progress is charged
    MIN_WEIGHT_CHARGE to the tenant, MIN_AREA_CHARGE to the area (was 8 bytes, 4), and the one past
    MAX_UPLOADS_IN_PROGRESS ends the stream RESOURCE_EXHAUSTED naming the cap (was: accepted without bound). (b) The
    charges all come back, and a normal client's upload and inference then work."""
    srv = served
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        s = _upload_stream(stub)
        _begin(s, 100)
        _wait(lambda: _staging(srv) == (100 * MIN_AREA_CHARGE, 100 * MIN_WEIGHT_CHARGE) or s.done.is_set(),
              "100 uploads begun, each charged MIN_AREA_CHARGE in the area, MIN_WEIGHT_CHARGE in the tenant's staging",
              timeout=5)
        assert not s.done.is_set(), s.error
        _begin(s, MAX_UPLOADS_IN_PROGRESS + 50 - 100)
        assert s.done.wait(REFUSED_S), "the stream was not refused"
        s.end()
        assert s.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, s.error
        assert f"({MAX_UPLOADS_IN_PROGRESS})" in s.error.details() and "on this stream" in s.error.details()
        _wait(lambda: _staging(srv) == (0, 0), "staging given back")
        assert srv.runtime.store.stats().staging_bytes == 0
        # the server goes on: a fresh stream of the same tenant begins and finishes a weight
        w = torch.arange(64, dtype=torch.float32)
        sha = hashlib.sha256(w.numpy().tobytes()).hexdigest()
        msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader(tenant=TENANT))]
        msgs += [pb.UploadWeightsRequest(chunk=c) for c in encode_weight_chunks(sha, w, 1 << 16)]
        r = stub.UploadWeights(iter(msgs), timeout=TIMEOUT)
        assert [x.sha256 for x in r.weights] == [sha]
    _client_works(srv)
    assert _staging(srv) == (0, 0)


def test_session_stream_uploads_stop_at_the_cap(served) -> None:
    """The same on a Session stream's in-stream weights: the session ends RESOURCE_EXHAUSTED naming the cap, its
    staging comes back, and the server goes on serving."""
    srv = served
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        s = _Stream(stub.Session, pb.SessionRequest(open=pb.OpenSession(tenant=TENANT, model_id="m")))
        _begin(s, MAX_UPLOADS_IN_PROGRESS + 20, wrap=lambda c: pb.SessionRequest(weight=c))
        assert s.done.wait(REFUSED_S), "the session was not refused"
        s.end()
        assert s.error is not None and s.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, s.error
        assert f"({MAX_UPLOADS_IN_PROGRESS})" in s.error.details()
        _wait(lambda: _staging(srv) == (0, 0), "staging given back")
    _client_works(srv, data_channel=False)


def test_half_received_uploads_stop_at_the_tenants_staging_limit(tmp_path) -> None:
    """With tokens, a tenant's staging limit (here ``staging_mb`` 1) bounds its uploads in progress at
    1 MiB / MIN_WEIGHT_CHARGE = 128, on one stream or many (was 131,072 of 8 bytes), with a refusal that says why;
    closing the streams gives every byte back."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tenants": {TENANT: {"token": TOKEN, "quota": {"staging_mb": 1}}}}))
    cfg = ServerConfig(cache_bytes=16 * MiB, threads=1, auth_tokens_file=str(tokens))
    from ue_client import wire

    limit = MiB // MIN_WEIGHT_CHARGE
    with ServerThread(config=cfg) as srv, wire.channel(srv.address, token=TOKEN) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        a, b = _upload_stream(stub), _upload_stream(stub)
        _begin(a, limit // 2)
        _wait(lambda: _staging(srv)[1] == limit // 2 * MIN_WEIGHT_CHARGE or a.done.is_set(),
              "half the limit begun, each charged MIN_WEIGHT_CHARGE", timeout=5)
        _begin(b, limit)  # the other half fits, the one after it does not
        assert b.done.wait(REFUSED_S), "the second stream was not refused"
        b.end()
        assert b.error is not None and b.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, b.error
        assert "staging limit" in b.error.details() and f"at least {MIN_WEIGHT_CHARGE} bytes" in b.error.details()
        assert not a.done.is_set()
        assert _staging(srv) == (limit // 2 * MIN_AREA_CHARGE, limit // 2 * MIN_WEIGHT_CHARGE)
        a.end()
        assert a.error is not None and a.error.code() == grpc.StatusCode.INVALID_ARGUMENT  # ended incomplete
        _wait(lambda: _staging(srv) == (0, 0), "staging given back")
        _client_works(srv, token=TOKEN)


def test_half_received_uploads_stop_at_the_staging_area(monkeypatch) -> None:
    """Without tokens the server-wide area bounds them across streams: a 2 MiB area holds 1024 uploads in progress
    at MIN_AREA_CHARGE each (was 524,288 of 4 received bytes; 256 at break37's 8 KiB); the next is refused "staging
    area full", and the area comes back."""
    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=2 * MiB, threads=1)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        fit = 2 * MiB // MIN_AREA_CHARGE
        a, b = _upload_stream(stub), _upload_stream(stub)
        _begin(a, fit - 6)
        _wait(lambda: _staging(srv)[0] == (fit - 6) * MIN_AREA_CHARGE or a.done.is_set(),
              "most of the area charged", timeout=5)
        _begin(b, 10)
        assert b.done.wait(REFUSED_S), "the second stream was not refused"
        b.end()
        assert b.error is not None and b.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, b.error
        assert "staging area full" in b.error.details()
        a.end()
        _wait(lambda: _staging(srv) == (0, 0), "staging given back")


@pytest.mark.parametrize("model", ["diamond", "wide"])
@pytest.mark.parametrize("data_channel", [True, False], ids=["data-channel", "session-stream"])
def test_our_client_keeps_few_uploads_in_progress(served, monkeypatch, data_channel: bool, model: str) -> None:
    """(c) Our client's upload of a real small model (the diamond's 13 small weights, or four 1 MiB ones sent in
    256 KiB chunks; on the data channel or the session's stream) never comes near the cap: count the uploads in
    progress on every stream the server serves, and the staging comes back to zero once they are stored."""
    peak = [0]
    begin = UploadTracker._upload_for

    def counting(self, *a, **kw):
        up = begin(self, *a, **kw)
        peak[0] = max(peak[0], len(self._uploads))
        return up

    monkeypatch.setattr(UploadTracker, "_upload_for", counting)
    from ue_client import wire

    _client_works(served, model, data_channel=data_channel, chunk_bytes=wire.MIN_CHUNK_BYTES)
    assert 1 <= peak[0] <= 4, peak[0]
    assert _staging(served) == (0, 0)
    assert served.runtime.store.stats().commits > 0
