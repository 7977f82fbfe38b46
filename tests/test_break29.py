"""break29: a fuzz of every allowlisted op's arguments (19,585 cases, each on the unguarded kernel and as the server
runs it, in forked children under canaries) found five holes past session 28's guards; each is fixed and attacked
again here, against a ``coinfer-edge serve`` process or the guarded kernels themselves.

Before the fixes: H1 (``embedding_bag`` with no bag for its indices: empty offsets, or one with
``include_last_offset``) killed the server with SIGSEGV; H2 (``_embedding_bag`` with stride-0 indices or offsets) and
H3 (``native_group_norm`` with a stride-0 weight) answered with heap memory (pointers in H2's error, heap floats
scaling H3's channels); H4 (``roll`` with 65,536 shifts) held one validation ~25 s; H5 (``conv3d`` with a stride of
2**62) answered the bias alone.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from modelgraph.allowlist import resolve
from modelgraph.runtime_guards import guarded
from tests.test_break28 import FK, _meta, _op, _spec


@pytest.fixture(scope="module")
def served():
    """One ``coinfer-edge serve`` process for the module's attacks (a fault that gets through kills it, and every
    later case fails too): (process, stub)."""
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
    from tests.test_server_cli import running_server

    with running_server("--threads", "1") as (proc, address):
        ch = grpc.insecure_channel(address)
        yield proc, pbg.EdgeServiceStub(ch)
        ch.close()


def _zeros(name, shape, dtype="float32"):
    return {"name": name, "target": "aten.zeros.default", "args": [list(shape)], "kwargs": FK(dtype),
            "outputs": [_meta(shape, dtype)]}


def _bag(target: str, mode: int, offsets: int, last: bool) -> bytes:
    """An embedding bag of 6 zero indices into a 3 x 4 weight with ``offsets`` zero offsets."""
    args = [{"t": "w"}, {"t": "idx"}, {"t": "off"}, False, mode, False, None, last]
    if target != "aten.embedding_bag.default":
        args.append(1 if target == "aten.embedding_bag.padding_idx" else -1)
    bags = max(offsets - (1 if last else 0), 0)
    return _spec([_zeros("w", [3, 4]), _zeros("idx", [6], "int64"), _zeros("off", [offsets], "int64"),
                  _op("eb", target, args, [_meta([bags, 4]), _meta([6], "int64"), _meta([bags], "int64"),
                                           _meta([bags, 4], "int64")], multi=True)], ["eb#0"])


def _roll(n: int) -> bytes:
    return _spec([_zeros("x", [2, 2]), _op("r", "aten.roll.default", [{"t": "x"}, [1] * n, [0] * n], [_meta([2, 2])])],
                 ["r"])


def _conv3d(stride: int) -> bytes:
    return _spec([_zeros("x", [1, 1, 2, 2, 2]), _zeros("k", [1, 1, 1, 1, 1]),
                  _op("o", "aten.conv3d.default", [{"t": "x"}, {"t": "k"}, None, [stride] * 3, [0, 0, 0], [1, 1, 1], 1],
                      [_meta([1, 1, 1, 1, 1])])], ["o"])


@pytest.mark.parametrize("case, spec, words", [
    ("H1 max mode, no offsets", _bag("aten.embedding_bag.default", 2, 0, False), "make no bag for the 6 indices"),
    ("H1 padding_idx, no offsets", _bag("aten.embedding_bag.padding_idx", 0, 0, False), "make no bag"),
    ("H1 _embedding_bag, no offsets", _bag("aten._embedding_bag.default", 2, 0, False), "make no bag"),
    ("H1 one closing offset", _bag("aten.embedding_bag.padding_idx", 0, 1, True), "the last one closing"),
    ("H4 roll of 65,536 shifts", _roll(65_536), "shifts has 65536 values, at most 64"),
    ("H5 conv3d stride 2**62", _conv3d(2**62), "stride holds 4611686018427387904, beyond the kernels' 32-bit"),
])
def test_a_strangers_slice_is_refused_and_the_server_goes_on(served, case: str, spec: bytes, words: str) -> None:
    from protos.coinfer.v1 import coinfer_pb2 as pb

    proc, stub = served
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1, warmup=0), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, e.value.details())
    assert words in e.value.details(), (case, e.value.details())
    assert time.monotonic() - t0 < 10, case  # H4 held validation ~25 s
    assert proc.poll() is None, case
    assert stub.Hello(pb.HelloRequest(client_version="t"), timeout=20).server_version


def test_the_same_ops_as_models_call_them_still_run(served) -> None:
    from protos.coinfer.v1 import coinfer_pb2 as pb

    _proc, stub = served
    for spec in (_bag("aten.embedding_bag.default", 2, 2, False), _bag("aten._embedding_bag.default", 0, 3, True),
                 _roll(2), _conv3d(2)):
        r = stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1, warmup=0), timeout=60)
        assert r.ops


def _spy(seen: list):
    def fn(*args, **kwargs):
        seen.append({k: v.is_contiguous() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return None

    return fn


def test_stride_zero_index_and_norm_parameters_reach_the_kernel_dense() -> None:
    """H2, H3: the kernels read these arguments as dense arrays whatever their strides; the guarded op passes them
    contiguous (and answers what eager answers on the contiguous tensors)."""
    seen: list = []
    one = torch.zeros(1, dtype=torch.int64)
    w = torch.randn(3, 4)
    guarded("aten._embedding_bag.default", _spy(seen))(w, one.expand(6), one.expand(2), False, 0, False, None,
                                                        False, -1)
    assert seen[-1]["indices"] and seen[-1]["offsets"], seen
    x, g = torch.randn(1, 8, 2, 2), torch.tensor([1.5])
    guarded("aten.native_group_norm.default", _spy(seen))(x, g.expand(8), g.expand(8), 1, 8, 4, 2, 1e-5)
    assert seen[-1]["weight"] and seen[-1]["bias"], seen

    def real(t):
        return guarded(t, resolve(t))

    got = real("aten.native_group_norm.default")(x, g.expand(8), None, 1, 8, 4, 2, 1e-5)[0]
    want = resolve("aten.native_group_norm.default")(x, g.expand(8).contiguous(), None, 1, 8, 4, 2, 1e-5)[0]
    assert torch.equal(got, want)
    idx = torch.tensor([0, 2, 1, 1, 0, 2])
    got = real("aten._embedding_bag.default")(w, one.expand(6), torch.tensor([0, 3]), False, 0, False, None, False, -1)
    want = resolve("aten._embedding_bag.default")(w, torch.zeros(6, dtype=torch.int64), torch.tensor([0, 3]), False,
                                                    0, False, None, False, -1)
    assert torch.equal(got[0], want[0])
    assert torch.equal(real("aten._embedding_bag.default")(w, idx, torch.tensor([0, 3]), False, 0, False, None,
                                                           False, -1)[0],
                       resolve("aten._embedding_bag.default")(w, idx, torch.tensor([0, 3]), False, 0, False, None,
                                                              False, -1)[0])
