"""A weight's sha256 binds its bytes, not a dtype or shape (session 14, from the wire).

What the server does, and why it is right:
- A held weight re-sent under another dtype/shape of the same byte count is ``already_present`` (its bytes
  are counted and dropped); the store keeps one blob per sha256.
- Every slice reads the bytes under ITS OWN declared meta (``edge_server.slices.weight_tensor``), never
  under the meta an upload carried. That is what a model with equal bytes under two metas needs (below:
  a [4, 8] and an [8, 4] parameter of the same bytes, a float32 [8] and a float64 [4] buffer of the same
  bytes): refusing a second meta would refuse such models; the answer equals ``model(x)``.
- A slice meta of another byte count than the held weight's: the request fails INVALID_ARGUMENT
  (``WeightIntegrityError``); a bool meta over bytes other than 0 and 1 likewise (before session 14 it
  ran: torch's kernels assume 0/1; the wire's bool tensors were already refused so).
- Another tenant's weight cannot be used by naming its sha256: tests/test_server_security.py
  (``test_another_tenants_weights_are_invisible_unusable_unevictable_undetectable``; proof of possession).
"""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
import torch
from torch import nn

from edge_server.config import MiB, ServerConfig
from edge_server.tensor_codec import encode_weight_chunks
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.test_server import request_msgs, run_session
from ue_client import CoinferClient, new_tenant, wire

CFG = ServerConfig(cache_bytes=64 * MiB, staging_bytes=64 * MiB)


@pytest.fixture(scope="module")
def srv():
    with ServerThread(config=CFG) as s:
        yield s


def _spec(wdtype: str, wshape: list[int], sha: str, xdtype: str, xshape: list[int],
          target: str = "aten.add.Tensor") -> bytes:
    """A one-op slice: r = target(x, w)."""
    return json.dumps({
        "version": 1, "model_hash": "", "outputs": ["r"],
        "weights": {"w": {"shape": wshape, "dtype": wdtype, "sha256": sha}},
        "inputs": {"x": {"shape": xshape, "dtype": xdtype}},
        "ops": [{"name": "r", "target": target, "args": [{"t": "x"}, {"w": "w"}], "kwargs": {},
                 "outputs": [{"shape": xshape, "dtype": xdtype}]}],
    }).encode()


def _weight(sha: str, t: torch.Tensor) -> list[pb.SessionRequest]:
    return [pb.SessionRequest(weight=c) for c in encode_weight_chunks(sha, t, 1 << 16)]


def _healthy(srv) -> None:
    with grpc.insecure_channel(srv.address) as ch:
        assert wire.stub(ch).Hello(pb.HelloRequest(tenant="h"), timeout=30).server_version


def test_a_held_weight_resent_under_another_meta_is_present_and_each_slice_reads_its_own(srv) -> None:
    w = torch.tensor([1.5, -2.0, 3.25, 0.0])
    sha = hashlib.sha256(w.numpy().tobytes()).hexdigest()
    msgs = [pb.SessionRequest(open=pb.OpenSession(tenant=new_tenant(), model_id="m", slice_id="f",
                                                  slice_spec_json=_spec("float32", [4], sha, "float32", [4])))]
    msgs += _weight(sha, w) + _weight(sha, w.view(torch.int32)) + _weight(sha, w.view(torch.int16).view(2, 4))
    for sid, spec in (("i", _spec("int32", [4], sha, "int32", [4])),
                      ("short", _spec("float32", [2], sha, "float32", [2]))):
        msgs.append(pb.SessionRequest(define_slice=pb.DefineSlice(slice_id=sid, slice_spec_json=spec)))
    msgs += request_msgs(1, {"x": torch.zeros(4)}, "f")
    msgs += request_msgs(2, {"x": torch.zeros(4, dtype=torch.int32)}, "i")
    msgs += request_msgs(3, {"x": torch.zeros(2)}, "short")
    msgs += request_msgs(4, {"x": torch.ones(4)}, "f")
    with grpc.insecure_channel(srv.address) as ch:
        c = run_session(wire.stub(ch), msgs)
    assert [(s.sha256, s.already_present) for s in c.stored] == [(sha, False), (sha, True), (sha, True)]
    assert not c.rejected
    torch.testing.assert_close(c.outputs[1]["r"], w, rtol=0, atol=0)  # the bytes as the slice declares them
    torch.testing.assert_close(c.outputs[2]["r"], w.view(torch.int32), rtol=0, atol=0)
    assert c.failed[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "WeightIntegrityError" in c.failed[3].message and "16 bytes" in c.failed[3].message
    torch.testing.assert_close(c.outputs[4]["r"], w + 1, rtol=0, atol=0)  # the session kept serving
    _healthy(srv)


def test_a_bool_meta_over_bytes_other_than_0_and_1_fails_the_request(srv) -> None:
    bad = torch.tensor([0, 2, 1, 0], dtype=torch.uint8)
    good = torch.tensor([0, 1, 1, 0], dtype=torch.uint8)
    sbad, sgood = (hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in (bad, good))
    spec = _spec("bool", [4], sbad, "bool", [4], "aten.logical_or.default")
    msgs = [pb.SessionRequest(open=pb.OpenSession(tenant=new_tenant(), model_id="m", slice_id="bad",
                                                  slice_spec_json=spec))]
    msgs += _weight(sbad, bad) + _weight(sgood, good.view(torch.bool))
    msgs.append(pb.SessionRequest(define_slice=pb.DefineSlice(
        slice_id="good", slice_spec_json=_spec("bool", [4], sgood, "bool", [4], "aten.logical_or.default"))))
    x = torch.tensor([True, True, False, False])
    msgs += request_msgs(1, {"x": x}, "bad") + request_msgs(2, {"x": x}, "good")
    with grpc.insecure_channel(srv.address) as ch:
        c = run_session(wire.stub(ch), msgs)
    assert c.failed[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "bool weight" in c.failed[1].message and 1 not in c.outputs
    torch.testing.assert_close(c.outputs[2]["r"], torch.logical_or(x, good.bool()), rtol=0, atol=0)
    _healthy(srv)


class Twins(nn.Module):
    """Weights with equal bytes under two metas: ``a`` [4, 8] and ``b`` [8, 4]; ``e`` float32 [8] and ``d``
    float64 [4]."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        a = torch.randn(4, 8, generator=g)
        self.a = nn.Parameter(a)
        self.b = nn.Parameter(a.reshape(8, 4).clone())
        e = torch.randn(8, generator=g)
        self.register_buffer("e", e)
        self.register_buffer("d", e.view(torch.float64).clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(x @ self.a.t()) @ self.b.t() + self.e
        return y, x[:, :4].double() * self.d


def test_a_model_with_equal_bytes_under_two_metas_runs_exactly(srv) -> None:
    model = Twins().eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(6))
    assert torch.isfinite(model.d).all()
    assert model.a.detach().numpy().tobytes() == model.b.detach().numpy().tobytes()
    assert model.e.numpy().tobytes() == model.d.numpy().tobytes()
    with torch.no_grad():
        want = model(x)
    client = CoinferClient(model, (x,), server=srv.address, policy="offload",
                           link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant())
    try:
        for _ in range(2):  # cold, then warm
            got = client(x)
            rep = client.reports[-1]
            assert not rep.fallback and rep.server_ops > 0, rep
            for g_, w_ in zip(got, want, strict=True):
                torch.testing.assert_close(g_, w_, rtol=0, atol=0)
    finally:
        client.close()
    _healthy(srv)
