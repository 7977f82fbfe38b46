"""break38 F2: ``torch.set_float32_matmul_precision`` on the UE, against the user's eager ``model(x)``.

"medium" makes CPU float32 matmuls bfloat16-precise on a CPU with AMX / AVX-512 BF16 (this project's machines), and
the eager module and local runs follow it; a server in its own process computed at "highest", so offloaded answers
were 1.6e-3 off ``model(x)``. Now each request carries the UE's setting (``BeginRequest.matmul_precision``) and the
server runs its ops under it (``edge_server.precision``): an older client's request (no field) runs at "highest",
any value but the three torch takes fails the request.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from edge_server.errors import InvalidArgument
from edge_server.precision import PrecisionGate
from edge_server.servicer import decode_begin_request
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.checks import FAST_LINK
from tests.test_server_cli import running_server
from ue_client import CoinferClient, new_tenant
from ue_client.verify import max_abs_diff, within_tolerance


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(38)
    return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64)).eval(), torch.randn(64, 256)


def _eager(module, x, precision: str) -> torch.Tensor:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with torch.no_grad():
            return module(x)
    finally:
        torch.set_float32_matmul_precision(before)


def test_an_offloaded_call_computes_at_the_ues_matmul_precision_on_a_server_in_its_own_process() -> None:
    module, x = _mlp()
    exact, medium = _eager(module, x, "highest"), _eager(module, x, "medium")
    if within_tolerance(medium, exact):
        pytest.skip("this CPU computes float32 matmuls alike at every precision (no AMX / AVX-512 BF16)")
    with running_server("--threads", "1") as (_, address), CoinferClient(
            module, (x,), server=address, policy="offload", link=FAST_LINK, tenant=new_tenant(), profile_runs=2,
            fallback=False, probe=False) as c:
        try:
            for precision, eager in (("medium", medium), ("highest", exact), ("medium", medium), ("high", None)):
                torch.set_float32_matmul_precision(precision)
                for k in range(2):  # cold and warm
                    y = c(x)
                    e = _eager(module, x, precision) if eager is None else eager
                    assert within_tolerance(y, e), (precision, k, max_abs_diff(y, e))
                    if eager is not None:  # ("high" is "highest" for a CPU's float32 matmuls: no TF32 there)
                        other = exact if precision == "medium" else medium
                        assert max_abs_diff(y, e) < max_abs_diff(y, other) / 10, (
                            precision, k, max_abs_diff(y, e), max_abs_diff(y, other))
        finally:
            torch.set_float32_matmul_precision("highest")
        assert all(r.server_ops == len(c.graph.ops) and not r.fallback for r in c.reports), c.reports


def test_the_begin_request_field_is_checked() -> None:
    """Empty (an older client): "highest"; one of the three values: itself; anything else fails the request
    (INVALID_ARGUMENT), its inline tensors dropped."""
    def decode(**kw):
        return decode_begin_request(pb.BeginRequest(request_id=3, **kw), 1 << 20, 8)

    assert decode().matmul_precision == "highest" and decode().input_error is None
    for p in ("highest", "high", "medium"):
        assert decode(matmul_precision=p).matmul_precision == p
    chunk = pb.TensorChunk(meta=pb.TensorMeta(name="x", dtype="float32", shape=[1]), total_bytes=4, data=b"\0" * 4)
    for bad in ("low", "HIGHEST", "medium ", "x" * 10_000):
        got = decode(matmul_precision=bad, inputs=[chunk])
        assert isinstance(got.input_error, InvalidArgument) and "matmul_precision" in str(got.input_error), bad
        assert got.matmul_precision == "highest" and not got.inputs and len(str(got.input_error)) < 200


def test_the_gate_holds_one_precision_at_a_time_and_puts_the_process_own_back() -> None:
    gate = PrecisionGate()
    assert torch.get_float32_matmul_precision() == "highest"
    seen: list[tuple[str, str]] = []
    start = threading.Barrier(4)

    def work(p: str) -> None:
        start.wait()
        for _ in range(20):
            with gate.hold(p):
                seen.append((p, torch.get_float32_matmul_precision()))
                time.sleep(0.0005)
                seen.append((p, torch.get_float32_matmul_precision()))

    threads = [threading.Thread(target=work, args=(p,)) for p in ("medium", "highest", "high", "medium")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 160 and all(want == got for want, got in seen), [s for s in seen if s[0] != s[1]][:5]
    assert torch.get_float32_matmul_precision() == "highest"
    with gate.hold("medium", "cuda"):  # a CUDA server's precision is the operator's (--tf32)
        assert torch.get_float32_matmul_precision() == "highest"
