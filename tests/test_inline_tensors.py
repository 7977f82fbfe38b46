"""A request in one message each way: cut tensors inside BeginRequest, outputs inside RequestDone, and the
server's per-op timings only when asked (``coinfer.proto``: ``BeginRequest.inputs``, ``RequestDone.outputs``,
``OpenSession.outputs_in_done`` / ``op_timings``, ``Limits.inline_tensors``).

A real edge server on a free loopback port, driven through the wire protocol (the minimal client of
``tests/test_server.py``) and through ``CoinferClient``. Inline tensors pass the same checks as TensorChunks
(names, shape, dtype, size, order, staging quota): each bad case fails its request alone with the right
status and a good request on the same stream right after is answered. Older clients' messages (chunks,
no ``outputs_in_done``) and an older server (no ``Limits.inline_tensors``) keep working.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from torch import nn

import modelgraph as mg
from edge_server import servicer as edge_servicer
from edge_server.config import MiB
from edge_server.tensor_codec import tensor_to_bytes
from modelgraph import zoo
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.test_server import (
    SMALL,
    Collected,
    assert_clean,
    assert_healthy,
    model,  # noqa: F401  (fixture)
    request_msgs,
    split_of,
    ue_part,
    weight_msgs,
)
from ue_client import CoinferClient, new_tenant, wire
from ue_client.cli_run import max_abs_diff

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}


@pytest.fixture(scope="module")
def server_options():
    return {"config": SMALL}  # max_chunk_bytes 1 MiB, staging 16 MiB


def open_msg(tenant: str, spec: mg.SliceSpec | None = None, *, outputs_in_done=True, op_timings=False):
    raw = spec.to_json().encode() if spec is not None else b""
    return pb.SessionRequest(open=pb.OpenSession(tenant=tenant, model_id="net", slice_spec_json=raw,
                                                 outputs_in_done=outputs_in_done, op_timings=op_timings))


def chunk_of(ref: str, t: torch.Tensor, rid: int = 0, **override) -> pb.TensorChunk:
    """A whole tensor as one TensorChunk; ``override``: fields to set after (name/dtype/shape: its meta's)."""
    raw = bytes(tensor_to_bytes(t))
    c = pb.TensorChunk(request_id=rid, meta=pb.TensorMeta(name=ref, dtype=str(t.dtype).removeprefix("torch."),
                                                          shape=list(t.shape)), offset=0, total_bytes=len(raw),
                       data=raw)
    for k, v in override.items():
        if k in ("name", "dtype", "shape"):
            if k == "shape":
                del c.meta.shape[:]
                c.meta.shape.extend(v)
            else:
                setattr(c.meta, k, v)
        else:
            setattr(c, k, v)
    return c


def begin_msg(rid: int, inputs: list[pb.TensorChunk], op_timings: bool = False, slice_id: str = ""):
    return pb.SessionRequest(begin_request=pb.BeginRequest(request_id=rid, slice_id=slice_id, inputs=inputs,
                                                           op_timings=op_timings))


def kinds_of(stub, msgs) -> tuple[Collected, list[str]]:
    """The session's answers, decoded (inline outputs too), and each response's kind in order."""
    c, kinds = Collected(), []
    for r in stub.Session(iter(msgs), timeout=30):
        kinds.append(r.WhichOneof("msg"))
        c.add(r)
        if kinds[-1] == "request_done":
            for o in r.request_done.outputs:
                c.add(pb.SessionResponse(output=o))
    return c, kinds


# ---- the encoder ------------------------------------------------------------------------------------------
def test_begin_request_encoding_equals_protobufs() -> None:
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.tensor([True, False])
    e = torch.zeros(0, 5)
    # request ids of 1 to 10 varint bytes, and again (the encoding of everything but the id is kept per
    # slice, names and inline tensors: a kept one must not leak another request's id or another slice's)
    for rid in (7, 1, 300, 2 ** 40 + 5, 2 ** 64 - 1, 7):
        for sid in ("s2", "s10"):
            for inputs, op_timings in (([], False), ([], True), ([a], False), ([a, b, e], True), ([b, a], False)):
                got = wire.begin_request(rid, sid, ("x", "y"), [(f"t{i}", str(t.dtype).removeprefix("torch."),
                                                                  tuple(t.shape), tensor_to_bytes(t))
                                                                 for i, t in enumerate(inputs)], op_timings)
                want = pb.SessionRequest(begin_request=pb.BeginRequest(
                    request_id=rid, slice_id=sid, input_names=["x", "y"], op_timings=op_timings,
                    inputs=[chunk_of(f"t{i}", t, rid) for i, t in enumerate(inputs)])).SerializeToString()
                assert got == want, (rid, sid, len(inputs), op_timings)


# ---- the server, through the wire ------------------------------------------------------------------------
def test_inline_request_is_one_message_each_way(server, channel, stub, model) -> None:  # noqa: F811
    """Cold (the inline input waits for the weights that follow) and warm, at a cut inside the model and
    with every op on the server: equal to local execution bit for bit; a warm answer is one RequestDone
    holding the output, and the hello says the server takes inline tensors."""
    graph, x = model
    ref = mg.run_graph(graph, (x,))
    assert edge_servicer.limits_pb  # the Hello's limits announce it
    assert stub.Hello(pb.HelloRequest(), timeout=10).limits.inline_tensors
    for k in (0, 3):
        split, spec = split_of(graph, k)
        cut = ue_part(graph, split, x)
        inline = [chunk_of(n, t) for n, t in cut.items()]
        msgs = [open_msg(f"inline{k}", spec), begin_msg(1, inline), *weight_msgs(graph, spec),
                begin_msg(2, inline)]
        c, kinds = kinds_of(stub, msgs)
        assert not c.failed, c.failed
        (name,) = spec.outputs
        for rid in (1, 2):
            torch.testing.assert_close(c.outputs[rid][name], ref, rtol=0, atol=0)
            assert c.done[rid].timings.total_ms >= c.done[rid].timings.compute_ms > 0
            assert not c.done[rid].timings.ops  # not asked for
        assert "output" not in kinds and kinds.count("request_done") == 2, kinds
        assert c.done[1].timings.weight_wait_ms > 0
    assert_clean(server)
    assert_healthy(channel)


def test_old_client_messages_still_work(server, channel, stub, model) -> None:  # noqa: F811
    """A client that sends TensorChunks and did not set ``outputs_in_done`` gets its outputs as chunks before
    RequestDone, as before; inline inputs with outputs as chunks, and chunks with outputs inline, mix."""
    graph, x = model
    ref = mg.run_graph(graph, (x,))
    split, spec = split_of(graph, 3)
    cut = ue_part(graph, split, x)
    (name,) = spec.outputs
    old = [open_msg("old", spec, outputs_in_done=False), *weight_msgs(graph, spec), *request_msgs(1, cut),
           begin_msg(2, [chunk_of(n, t) for n, t in cut.items()])]
    c, kinds = kinds_of(stub, old)
    assert not c.failed and kinds.count("output") == 2, kinds
    assert all(not d.outputs for d in c.done.values())
    new = [open_msg("old", spec), *request_msgs(3, cut)]
    c2, kinds2 = kinds_of(stub, new)
    assert "output" not in kinds2 and len(c2.done[3].outputs) == 1
    for got in (c.outputs[1], c.outputs[2], c2.outputs[3]):
        torch.testing.assert_close(got[name], ref, rtol=0, atol=0)
    assert_clean(server)


def test_per_op_timings_only_when_asked(server, stub, model) -> None:  # noqa: F811
    graph, x = model
    split, spec = split_of(graph, 0)
    inline = [chunk_of(n, t) for n, t in ue_part(graph, split, x).items()]
    names = [op.name for op in spec.ops]
    c, _ = kinds_of(stub, [open_msg("ops", spec), *weight_msgs(graph, spec), begin_msg(1, inline),
                           begin_msg(2, inline, op_timings=True)])
    assert [o.name for o in c.done[1].timings.ops] == [] and c.done[1].timings.compute_ms > 0
    assert [o.name for o in c.done[2].timings.ops] == names
    c, _ = kinds_of(stub, [open_msg("ops", spec, op_timings=True), begin_msg(3, inline)])
    assert [o.name for o in c.done[3].timings.ops] == names


class Wide(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2.0


def test_outputs_over_the_chunk_limit_stream_as_chunks(server, stub) -> None:
    """An output larger than ``max_chunk_bytes`` (1 MiB here) goes as TensorChunks even to a client that
    reads outputs in RequestDone; its input, too large to go inline, streams as chunks."""
    x = torch.randn(1, 300_000)  # 1.2 MB
    graph = mg.capture(Wide().eval(), (x,), name="wide")
    split = graph.split(op.name for op in graph.ops)
    spec = mg.make_slice(graph, split)
    cut = ue_part(graph, split, x)
    c, kinds = kinds_of(stub, [open_msg("wide", spec), *request_msgs(1, cut)])
    assert not c.failed, c.failed
    assert kinds.count("output") >= 2 and not c.done[1].outputs
    torch.testing.assert_close(c.outputs[1][spec.outputs[0]], mg.run_graph(graph, (x,)), rtol=0, atol=0)


def _bad_inline_cases(cut: dict[str, torch.Tensor]):
    (n, t), = cut.items()
    big = torch.zeros(150_000)  # 600 kB: two of them over max_chunk_bytes (1 MiB) in all
    ok = chunk_of(n, t)
    return [
        ([chunk_of("ghost", t)], "INVALID_ARGUMENT", "not an input"),
        ([chunk_of(n, torch.zeros(2, 2))], "INVALID_ARGUMENT", "expects"),
        ([chunk_of(n, t.double())], "INVALID_ARGUMENT", "expects"),
        ([chunk_of(n, t, dtype="float99")], "INVALID_ARGUMENT", "dtype"),
        ([chunk_of(n, t, total_bytes=ok.total_bytes + 4)], "INVALID_ARGUMENT", "total_bytes"),
        ([chunk_of(n, t, data=ok.data + b"1234")], "INVALID_ARGUMENT", "past the end"),
        ([chunk_of(n, t, offset=4, data=ok.data[4:])], "INVALID_ARGUMENT", "offset"),
        ([chunk_of(n, t, shape=[-1])], "INVALID_ARGUMENT", "invalid dimension"),
        ([chunk_of(n, t, name="")], "INVALID_ARGUMENT", "without a name"),
        ([ok, ok], "INVALID_ARGUMENT", "sent twice"),
        ([chunk_of(n, t, rid=99)], "INVALID_ARGUMENT", "names request 99"),
        ([chunk_of("a", big), chunk_of("b", big)], "INVALID_ARGUMENT", "exceed max_chunk_bytes"),
    ]


def test_bad_inline_tensors_fail_their_request_alone(server, channel, stub, model) -> None:  # noqa: F811
    """Every check a TensorChunk gets, an inline tensor gets: the request fails with the status and the
    reason, and the next request on the same stream is answered correctly."""
    graph, x = model
    ref = mg.run_graph(graph, (x,))
    split, spec = split_of(graph, 3)
    cut = ue_part(graph, split, x)
    good = [chunk_of(n, t) for n, t in cut.items()]
    for inputs, code, needle in _bad_inline_cases(cut):
        c, _ = kinds_of(stub, [open_msg("bad", spec), *weight_msgs(graph, spec), begin_msg(1, inputs),
                               begin_msg(2, good)])
        assert list(c.failed) == [1], (needle, c.failed)
        assert c.failed[1].code == grpc.StatusCode[code].value[0] and needle in c.failed[1].message, \
            (needle, c.failed[1])
        torch.testing.assert_close(c.outputs[2][spec.outputs[0]], ref, rtol=0, atol=0)
    # a tensor sent inline and then again as a chunk (the request still waits for its weights): sent twice
    c, _ = kinds_of(stub, [open_msg("bad2", spec), begin_msg(1, good), *request_msgs(1, cut)[1:],
                           *weight_msgs(graph, spec), begin_msg(2, good)])
    assert list(c.failed) == [1] and "sent twice" in c.failed[1].message, c.failed
    assert 2 in c.outputs
    assert_clean(server)
    assert_healthy(channel)


def test_inline_tensor_over_the_staging_quota_is_resource_exhausted(server, channel, stub) -> None:
    """The first chunk of a 20 MB cut tensor sent inline declares the whole tensor, as a TensorChunk does: over
    the 16 MiB staging area the request fails RESOURCE_EXHAUSTED at once; the next one runs."""
    x = torch.randn(5 * MiB)  # 20 MiB
    graph = mg.capture(Wide().eval(), (x,), name="huge")
    split = graph.split(op.name for op in graph.ops)
    spec = mg.make_slice(graph, split)
    (name,) = split.cut_tensors
    head = pb.TensorChunk(meta=pb.TensorMeta(name=name, dtype="float32", shape=list(x.shape)), offset=0,
                          total_bytes=x.numel() * 4, data=bytes(64 << 10))
    small = torch.randn(1, 8)
    g2 = mg.capture(Wide().eval(), (small,), name="small")
    s2 = g2.split(op.name for op in g2.ops)
    spec2 = mg.make_slice(g2, s2)
    define2 = pb.SessionRequest(define_slice=pb.DefineSlice(slice_id="s", slice_spec_json=spec2.to_json().encode()))
    c, _ = kinds_of(stub, [open_msg("staging", spec), define2, begin_msg(1, [head]),
                           begin_msg(2, [chunk_of(n, t) for n, t in ue_part(g2, s2, small).items()], slice_id="s")])
    assert list(c.failed) == [1] and c.failed[1].code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], c.failed
    torch.testing.assert_close(c.outputs[2][spec2.outputs[0]], mg.run_graph(g2, (small,)), rtol=0, atol=0)
    assert server.runtime.store.stats().staging_bytes == 0
    assert_clean(server)
    assert_healthy(channel)


# ---- the device runtime ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ue_server():
    """A server with the default limits and room for resnet18's weights (the module's ``server`` has 32 MiB)."""
    from edge_server.testing import ServerThread

    srv = ServerThread(threads=1, cache_mb=256).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def wire_log(monkeypatch):
    """What the client's requests carried: inline input bytes per BeginRequest, inline outputs per Done."""
    log = {"inline_in": [], "inline_out": [], "chunks_in": 0}
    begin, decode, chunk = wire.begin_request, wire.decode_event, wire.encode_tensor_chunk

    def begin_request(rid, sid, names, inputs=(), op_timings=False, **kw):
        log["inline_in"].append(sum(len(d) for *_, d in inputs))
        return begin(rid, sid, names, inputs, op_timings, **kw)

    def decode_event(r):
        ev = decode(r)
        if isinstance(ev, wire.Done):
            log["inline_out"].append(len(ev.outputs))
        return ev

    def encode_tensor_chunk(*a):
        log["chunks_in"] += 1
        return chunk(*a)

    monkeypatch.setattr(wire, "begin_request", begin_request)
    monkeypatch.setattr(wire, "decode_event", decode_event)
    monkeypatch.setattr(wire, "encode_tensor_chunk", encode_tensor_chunk)
    return log


def _run(server, spec: str, requests: int = 3, **kw):
    with CoinferClient(spec, server=server.address, link=FAST, tenant=new_tenant(), fallback=False, **kw) as c:
        for i in range(requests):
            x = tuple(t.clone() for t in c.example_inputs) if i == 0 else tuple(
                torch.randn_like(t) if t.is_floating_point() else t.clone() for t in c.example_inputs)
            y = c(*x)
            assert max_abs_diff(y, c.reference(*x)) == 0.0, (spec, i, c.last_report)
            assert max_abs_diff(y, c.eager(*x)) <= 1e-4, (spec, i)
            assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
        return c.graph


@pytest.mark.parametrize("name", ["chain", "diamond", "multi_io", "tiny_vit", "shared_weights"])
def test_zoo_offloaded_through_the_inline_path_equals_eager(ue_server, wire_log, name) -> None:
    """Every op on the server, cold then warm: each request one BeginRequest with its inputs and one
    RequestDone with its outputs (no tensor chunk either way), results equal to the eager model's."""
    _run(ue_server, zoo.spec(name), policy="offload")
    assert wire_log["inline_in"] and all(n > 0 for n in wire_log["inline_in"]), wire_log
    assert wire_log["chunks_in"] == 0
    assert wire_log["inline_out"] and all(n > 0 for n in wire_log["inline_out"]), wire_log


@pytest.mark.parametrize("name", ["chain", "diamond", "tiny_vit"])
def test_zoo_split_streams_the_prefix_cut_tensors(ue_server, wire_log, name) -> None:
    """A split inside the model: the cut tensors the UE prefix makes stream as chunks when each exists
    (none is a graph input here), the outputs come inside RequestDone; equal to eager, cold and warm."""
    n = len(CoinferClient(zoo.spec(name)).graph.ops)
    _run(ue_server, zoo.spec(name), policy="offload", server_ops=max(1, n // 2))
    assert all(b == 0 for b in wire_log["inline_in"]) and wire_log["chunks_in"] >= 3, wire_log
    assert all(k > 0 for k in wire_log["inline_out"]), wire_log


def test_an_older_server_and_an_older_client_use_chunks(ue_server, wire_log, monkeypatch) -> None:
    """A server that does not announce ``inline_tensors`` gets every cut tensor as chunks; a client that does
    not ask ``outputs_in_done`` gets outputs as chunks: both still equal eager, cold and warm."""
    limits = edge_servicer.limits_pb

    def old_limits(info):
        m = limits(info)
        m.inline_tensors = False
        return m

    monkeypatch.setattr(edge_servicer, "limits_pb", old_limits)
    open_session = wire.open_session
    monkeypatch.setattr(wire, "open_session", lambda *a, **k: open_session(*a, **{**k, "outputs_in_done": False}))
    _run(ue_server, zoo.spec("multi_io"), policy="offload")
    _run(ue_server, zoo.spec("tiny_vit"), policy="offload")
    assert all(b == 0 for b in wire_log["inline_in"]) and wire_log["chunks_in"] >= 5, wire_log
    assert all(k == 0 for k in wire_log["inline_out"]), wire_log


def test_resnet18_offloaded_and_split_through_the_inline_path(ue_server, wire_log) -> None:
    """resnet18's 602 kB input goes inside BeginRequest, cold and warm; split in the middle, its cut tensor
    streams; both equal eager."""
    graph = _run(ue_server, "torchvision:resnet18", requests=2, policy="offload")
    assert wire_log["inline_in"] == [3 * 224 * 224 * 4] * 2 and wire_log["chunks_in"] == 0, wire_log
    _run(ue_server, "torchvision:resnet18", requests=2, policy="offload", server_ops=len(graph.ops) // 2)
    assert wire_log["chunks_in"] >= 2 and wire_log["inline_out"] == [1] * 4, wire_log
