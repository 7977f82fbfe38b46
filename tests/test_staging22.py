"""Session 22 (review22): one tenant filled the server's staging area with 1 MiB of traffic. An UploadWeights
chunk declaring a big weight reserved its whole size of the server-wide staging area at its first byte, and any
message restarted the upload's idle clock. Real servers on port 0 with tokens, raw clients on the protos (and
one CoinferClient). Each test failed before its fix (said in each docstring)."""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import torch
from torch import nn

from edge_server.config import MiB
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack21 import TENANTS, _md, _server, _until

CACHE = 128 * MiB
"""The weight cache of these servers: 25 MiB reserved to each of the 5 tenants (break31 F4), room for the weights
the staging attacks declare (the 16 MiB cache of ``_server`` reserves 3 MiB each, under them)."""


def _chunk(sha: str, total: int, data: bytes, offset: int = 0) -> pb.UploadWeightsRequest:
    return pb.UploadWeightsRequest(chunk=pb.WeightChunk(sha256=sha, dtype="uint8", shape=[total], offset=offset,
                                                        total_bytes=total, data=data))


class _Hold:
    """An UploadWeights call of ``who`` that declares ``total`` bytes, sends ``sent`` of them, then (optionally)
    one more byte every ``trickle_s`` until :meth:`stop`; ``error`` is how the server ended it."""

    def __init__(self, stub, who: str, total: int, sent: int, trickle_s: float = 0.0, seed: int = 0) -> None:
        self._stop = threading.Event()
        self.sha = hashlib.sha256(f"{who}{seed}".encode()).hexdigest()
        self.total, self.sent, self.trickle_s = total, sent, trickle_s
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        self._fut = stub.UploadWeights.future(self._msgs(), metadata=_md(who), timeout=60)
        self._fut.add_done_callback(self._ended)

    def _msgs(self):
        yield pb.UploadWeightsRequest(header=pb.UploadHeader())
        yield _chunk(self.sha, self.total, b"\x01" * self.sent)
        off = self.sent
        while not self._stop.wait(self.trickle_s or 30):
            if self.trickle_s:
                yield _chunk(self.sha, self.total, b"\x01", off)
                off += 1

    def _ended(self, fut) -> None:
        try:
            fut.result()
        except grpc.RpcError as e:
            self.error = e
        except grpc.FutureCancelledError:
            pass
        finally:
            self.done.set()

    def stop(self) -> None:
        self._stop.set()
        self._fut.cancel()
        self.done.wait(10)


def _upload(stub, who: str, data: bytes, chunk: int = 1 << 20) -> pb.UploadWeightsResponse:
    sha = hashlib.sha256(data).hexdigest()
    msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader())]
    msgs += [_chunk(sha, len(data), data[o : o + chunk], o) for o in range(0, len(data), chunk)]
    return stub.UploadWeights(iter(msgs), metadata=_md(who), timeout=30)


def _staging(srv, tenant: str | None = None) -> int:
    return srv.runtime.store.stats(tenant).staging_bytes


def test_a_tenant_declaring_the_whole_staging_area_is_refused_and_takes_nothing(tmp_path):
    """Before: alice's UploadWeights declaring the server's whole 16 MiB staging area, 1 MiB sent, reserved all of
    it, and bob's 4 MiB upload was refused RESOURCE_EXHAUSTED "staging area full". Now a tenant stages at most half
    the area: alice's call is refused at once naming the limit, bob's upload goes through."""
    with _server(tmp_path, cache_bytes=CACHE) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        hold = _Hold(stub, "alice", 16 * MiB, 1 * MiB)
        try:
            assert hold.done.wait(10)
            assert hold.error is not None and hold.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "half the server's staging area" in hold.error.details()
            data = torch.randn(1 << 20).numpy().tobytes()  # 4 MiB
            assert len(_upload(stub, "bob", data).weights) == 1
        finally:
            hold.stop()
        _until(lambda: _staging(srv) == 0 and _staging(srv, "alice") == 0)


def test_declared_but_unsent_bytes_take_no_other_tenants_staging(tmp_path):
    """Before: alice and carol each declared 8 MiB (within their quota) and sent 256 KiB: the 16 MiB area was
    full, bob's 4 MiB upload was refused "staging area full" and his ordinary CoinferClient request failed
    "staging area full: 16777216 + 1024 bytes". Now the area is charged what arrived (512 KiB): bob's upload and
    request go through, alice and carol are still charged their declarations, and all is given back after."""
    from tests.test_attack21 import _scrape
    from ue_client.client import CoinferClient

    with _server(tmp_path, metrics_port=0, cache_bytes=CACHE) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        holds = [_Hold(stub, who, 8 * MiB, 256 << 10) for who in ("alice", "carol")]
        try:
            _until(lambda: _staging(srv, "alice") == _staging(srv, "carol") == 8 * MiB and _staging(srv) == 512 << 10)
            m = _scrape(srv.server.metrics_server.server_port)  # the operator sees both
            assert m["coinfer_staging_area_bytes"] == 512 << 10 and m["coinfer_staging_area_capacity_bytes"] == 16 * MiB
            assert m['coinfer_staging_bytes{tenant="alice"}'] == 8 * MiB
            data = torch.randn(1 << 20).numpy().tobytes()  # 4 MiB
            assert len(_upload(stub, "bob", data).weights) == 1
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
            x = torch.randn(4, 64)
            with CoinferClient(m, (x,), server=srv.address, token=TENANTS["bob"], policy="offload", server_ops=0,
                               fallback=False, probe=False, link={"uplink_mbps": 400.0, "rtt_ms": 2.0},
                               profile_runs=2) as c:
                y = c(x)
                assert c.last_report.server_ops > 0
                torch.testing.assert_close(y, m(x), rtol=0, atol=0)
            assert all(not h.done.is_set() for h in holds)
        finally:
            for h in holds:
                h.stop()
        _until(lambda: _staging(srv) == 0 and _staging(srv, "alice") == _staging(srv, "carol") == 0)


def test_a_trickle_of_bytes_does_not_keep_a_half_received_weight(tmp_path):
    """Before: any message restarted an upload's idle clock, so one byte every 0.2 s (every 299 s at the default
    300 s) held alice's half-received weight for ever. Now, with a weight half-received, only
    ``upload_progress_bytes`` or a weight's end restarts it: the call ends DEADLINE_EXCEEDED after about
    ``session_idle_s`` and its staging is free."""
    with _server(tmp_path, session_idle_s=1.0, cache_bytes=CACHE) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        hold = _Hold(stub, "alice", 4 * MiB, 64 << 10, trickle_s=0.2)
        try:
            t0 = time.monotonic()
            assert hold.done.wait(6), "the trickled upload was not ended"
            assert hold.error is not None and hold.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "idle" in hold.error.details() and time.monotonic() - t0 < 4
        finally:
            hold.stop()
        _until(lambda: _staging(srv) == 0 and _staging(srv, "alice") == 0)


def test_a_slow_upload_that_progresses_is_not_ended(tmp_path):
    """The other side: a 1 MiB upload in 256 KiB chunks sent 0.6 s apart, with a 1.5 s idle clock and 256 KiB of
    progress asked for, completes (each chunk restarts the clock), and the clock only starts over on progress:
    the whole upload takes longer than one idle period."""
    with _server(tmp_path, session_idle_s=1.5, upload_progress_bytes=256 << 10) as srv, \
            grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        data = torch.randn(MiB // 4).numpy().tobytes()
        sha = hashlib.sha256(data).hexdigest()
        step = 256 << 10

        def msgs():
            yield pb.UploadWeightsRequest(header=pb.UploadHeader())
            for o in range(0, len(data), step):
                time.sleep(0.6)
                yield _chunk(sha, len(data), data[o : o + step], o)

        t0 = time.monotonic()
        r = stub.UploadWeights(msgs(), metadata=_md("alice"), timeout=60)
        assert time.monotonic() - t0 > 1.5
        assert [w.sha256 for w in r.weights] == [sha]
        assert srv.runtime.store.has("alice", sha) and _staging(srv) == 0 and _staging(srv, "alice") == 0


def test_a_request_tensor_declared_but_unsent_holds_only_what_arrived(tmp_path):
    """The Session path stages request tensors the same way: before, a request's 4 MiB input reserved 4 MiB of the
    server-wide area (and committed a zeroed 4 MiB buffer) at its first 64 KiB chunk. Now the tenant is charged
    the 4 MiB it declared, the area the 64 KiB that arrived, and both are given back when the session ends."""
    import modelgraph as mg
    from edge_server.tensor_codec import encode_tensor_chunks
    from edge_server.weight_store import MIN_AREA_CHARGE

    x = torch.randn(1, 1 << 20)  # 4 MiB
    graph = mg.capture(nn.Sequential(nn.ReLU()).eval(), (x,), name="relu")
    split = graph.split_at(0)
    spec = mg.make_slice(graph, split).to_json().encode()
    first = next(iter(encode_tensor_chunks(1, split.cut_tensors[0], x, 64 << 10)))
    with _server(tmp_path) as srv, grpc.insecure_channel(srv.address) as ch:
        stop = threading.Event()

        def msgs():
            yield pb.SessionRequest(open=pb.OpenSession(model_id="relu", slice_spec_json=spec))
            yield pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1))
            yield pb.SessionRequest(tensor=first)
            stop.wait(30)

        call = pbg.EdgeServiceStub(ch).Session(msgs(), metadata=_md("alice"), timeout=60)
        try:
            assert next(call).WhichOneof("msg") == "opened"
            # (and the area its bookkeeping, MIN_AREA_CHARGE: break39 F1)
            _until(lambda: _staging(srv, "alice") == 4 * MiB and _staging(srv) == (64 << 10) + MIN_AREA_CHARGE)
        finally:
            stop.set()
            call.cancel()
        _until(lambda: _staging(srv) == 0 and _staging(srv, "alice") == 0)
