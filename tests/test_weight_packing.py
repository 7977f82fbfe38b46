"""Packed weight messages and batched acknowledgements on a real edge server (issue 12: UE CPU per byte).

A ``SessionRequest.weights`` message carries several weight chunks; a client that set
``OpenSession.batch_acks`` gets the weights committed in one burst acknowledged in one ``weights_stored``
message. Bounds: an empty or oversized pack ends the session with INVALID_ARGUMENT and leaves nothing
staged; the server goes on serving. The device runtime's ``SessionStream`` uses both against the server.
"""

from __future__ import annotations

import hashlib
import threading

import grpc
import pytest
import torch

import modelgraph as mg
from edge_server.config import MiB, ServerConfig
from edge_server.tensor_codec import tensor_to_bytes
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.test_server import (
    TIMEOUT,
    Collected,
    Net,
    assert_clean,
    assert_healthy,
    request_msgs,
    split_of,
    ue_part,
)
from ue_client import session as S
from ue_client import wire

CONFIG = ServerConfig(
    cache_bytes=32 * MiB,
    staging_bytes=16 * MiB,
    max_chunk_bytes=1 * MiB,
    max_message_bytes=2 * MiB,
    max_chunks_per_message=8,
)


@pytest.fixture(scope="module")
def server_options():
    return {"config": CONFIG, "threads": 1}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return mg.capture(net, (x,), name="net"), x


def _open(tenant: str, spec: mg.SliceSpec, batch_acks: bool) -> pb.SessionRequest:
    return pb.SessionRequest(
        open=pb.OpenSession(
            tenant=tenant, model_id="net", slice_spec_json=spec.to_json().encode(), batch_acks=batch_acks
        )
    )


def _chunks(graph: mg.ModelGraph, spec: mg.SliceSpec) -> list[pb.WeightChunk]:
    """One whole-weight chunk per distinct weight of the slice."""
    out, seen = [], set()
    for name, entry in spec.weights.items():
        if entry.sha256 not in seen:
            seen.add(entry.sha256)
            t = graph.weight_values[name]
            out.append(
                pb.WeightChunk(
                    sha256=entry.sha256,
                    dtype=str(t.dtype).removeprefix("torch."),
                    shape=list(t.shape),
                    offset=0,
                    total_bytes=t.nbytes,
                    data=bytes(tensor_to_bytes(t)),
                )
            )
    return out


def _session(stub, msgs) -> tuple[Collected, list[pb.WeightsStored]]:
    c, batches = Collected(), []
    for r in stub.Session(iter(msgs), timeout=TIMEOUT):
        if r.WhichOneof("msg") == "weights_stored":
            batches.append(r.weights_stored)
        c.add(r)
    return c, batches


@pytest.mark.parametrize("batch_acks", [True, False])
def test_packed_weights_run_the_slice_and_acks_follow_the_client(server, channel, stub, model, batch_acks):
    graph, x = model
    split, spec = split_of(graph, 3)
    chunks = _chunks(graph, spec)
    assert len(chunks) >= 3
    hello = stub.Hello(pb.HelloRequest(tenant="t"), timeout=5)
    assert hello.limits.max_chunks_per_message == 8
    tenant = f"pack-{batch_acks}"
    msgs = [
        _open(tenant, spec, batch_acks),
        *request_msgs(1, ue_part(graph, split, x)),
        pb.SessionRequest(weights=pb.WeightChunks(chunks=chunks[:-1])),
        pb.SessionRequest(weight=chunks[-1]),
    ]
    c, batches = _session(stub, msgs)
    assert not c.failed, c.failed
    torch.testing.assert_close(c.outputs[1][spec.outputs[0]], mg.run_graph(graph, (x,)), rtol=0, atol=0)
    shas = [ch.sha256 for ch in chunks]
    if batch_acks:  # the packed weights were committed in one burst: one message acknowledges them
        assert [[w.sha256 for w in b.weights] for b in batches] == [shas[:-1]]
        assert [w.sha256 for w in c.stored] == shas[-1:]  # a lone weight: the plain message
    else:
        assert batches == [] and [w.sha256 for w in c.stored] == shas
    q = stub.QueryWeights(pb.QueryWeightsRequest(tenant=tenant, sha256=shas), timeout=5)
    assert sorted(q.present) == sorted(shas)
    assert_clean(server)
    assert_healthy(channel)


def _error(stub, msgs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        for _ in stub.Session(iter(msgs), timeout=TIMEOUT):
            pass
    return ei.value


def test_bad_packs_end_the_session_and_leave_nothing(server, channel, stub, model):
    graph, _ = model
    _, spec = split_of(graph, 3)
    good = _chunks(graph, spec)
    big = [
        pb.WeightChunk(
            sha256="ab" * 32, dtype="uint8", shape=[600_000], offset=0, total_bytes=600_000, data=bytes(600_000)
        )
        for _ in range(2)
    ]  # 1.2 MB together > max_chunk_bytes
    forged = pb.WeightChunk()
    forged.CopyFrom(good[1])
    forged.data = bytes(len(forged.data))  # fails its hash
    cases = {
        "empty": pb.WeightChunks(),
        "too many": pb.WeightChunks(chunks=[good[0]] * 9),
        "too large": pb.WeightChunks(chunks=big),
        "hash": pb.WeightChunks(chunks=[good[0], forged]),
    }
    for what, pack in cases.items():
        err = _error(stub, [_open(f"bad-{what}", spec, True), pb.SessionRequest(weights=pack)])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.code(), err.details())
    q = stub.QueryWeights(pb.QueryWeightsRequest(tenant="bad-hash", sha256=[forged.sha256]), timeout=5)
    assert list(q.present) == []
    assert_clean(server)
    assert_healthy(channel)


def test_session_stream_packs_small_weights_and_reads_batched_acks(server, channel):
    """The device runtime against the server: 40 small weights and a large one go in a few messages,
    every weight is acknowledged once and held."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=g) for n in [300] * 40 + [700_000]]
    datas = [memoryview(bytearray(tensor_to_bytes(t))) for t in tensors]
    shas = [hashlib.sha256(d).hexdigest() for d in datas]
    acked: list[str] = []
    done = threading.Event()

    def on_ack(ack, t):
        acked.append(ack.sha256)
        if len(acked) == len(shas):
            done.set()

    st = wire.stub(channel)
    sess = S.SessionStream(st, "packer", "m", on_weight_ack=on_ack)
    try:
        assert sess.queue.max_pack == 8 and sess.queue.message_bytes == 1 * MiB
        for i, (sha, d, t) in enumerate(zip(shas, datas, tensors)):
            sess.queue.put(S.UplinkItem("weight", sha, "float32", tuple(t.shape), d, (S.FOREGROUND, i, 0)))
        assert done.wait(TIMEOUT), f"{len(acked)} of {len(shas)} acknowledged"
        assert sorted(acked) == sorted(shas) and sess.held == set(shas)
        # 40 x 1.2 kB in 8-chunk packs (5 messages), then 2.8 MB in 1 MiB messages (3)
        assert sess.queue.sent.weight_messages == 8
    finally:
        sess.close(5.0)
    assert_clean(server)
    assert_healthy(channel)
