"""break28: what a fresh tester found past the session's first kernel guards, each fixed (``modelgraph.runtime_guards``,
``modelgraph.kernel_shapes``) and attacked again here as they were found: a stranger's ProfileGraph of a few hundred
bytes against a ``coinfer-edge serve`` process, or the server's own validator and runtime on a client's slice.

Before the fixes: F1 (``div`` trunc of int64 MIN by -1) and F2 (``avg_pool2d`` of int64 MIN with divisor -1) killed
the server with SIGFPE, F3 (``upsample_bicubic2d`` of uint8 with a scale of 1e-20) with SIGSEGV; F5 (a training-mode
batch norm) wrote another tenant's weights; F7 (``unbind`` of 2^23 elements) took 45 s and 7 GB to validate; F8 (an
LSTM of 32,768 layers) held validation 92 s.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch


def FK(dt: str) -> dict:  # a factory's keyword arguments (dtype, no device)
    return {"dtype": {"dtype": dt}, "device": {"device": None}, "pin_memory": False}


def _meta(shape, dtype="float32"):
    return {"shape": list(shape), "dtype": dtype}


def _full(name, shape, value, dtype):
    return {"name": name, "target": "aten.full.default", "args": [list(shape), value], "kwargs": FK(dtype),
            "outputs": [_meta(shape, dtype)]}


def _op(name, target, args, outputs, kwargs=None, multi=False):
    return {"name": name, "target": target, "args": args, "kwargs": kwargs or {}, "outputs": outputs, "multi": multi}


def _spec(ops, outputs) -> bytes:
    return json.dumps({"version": 1, "ops": ops, "inputs": {}, "outputs": outputs, "weights": {}}).encode()


def _div(mode: str, dtype: str = "int64") -> bytes:
    mn = -(2**63) if dtype == "int64" else -(2**31)
    return _spec([_full("a", [4], mn, dtype), _full("b", [4], -1, dtype),
                  _op("q", "aten.div.Tensor_mode", [{"t": "a"}, {"t": "b"}], [_meta([4], dtype)],
                      {"rounding_mode": mode})], ["q"])


def _pool(divisor: int) -> bytes:
    return _spec([_full("a", [1, 1, 2, 2], -(2**63), "int64"),
                  _op("p", "aten.avg_pool2d.default", [{"t": "a"}, [1, 1], [1, 1], [0, 0], False, True, divisor],
                      [_meta([1, 1, 2, 2], "int64")])], ["p"])


def _bicubic(scale) -> bytes:
    return _spec([_full("x", [1, 5, 3, 3], 0, "uint8"),
                  _op("u", "aten.upsample_bicubic2d.default", [{"t": "x"}, [7, 7], False, scale, scale],
                      [_meta([1, 5, 7, 7], "uint8")])], ["u"])


def _div_wrapping() -> bytes:
    """break28b N1: a 0-dim int64 2**31 does not widen an int32 division; cast, it is int32's MIN."""
    return _spec([_full("a", [], 2**31, "int64"), _full("b", [4], -1, "int32"),
                  _op("q", "aten.div.Tensor_mode", [{"t": "a"}, {"t": "b"}], [_meta([4], "int32")],
                      {"rounding_mode": "trunc"})], ["q"])


def _bicubic_to_one(scale) -> bytes:
    """break28b N2: an output dim of 1 let any scale in (0, 2 / size_in] through the first scale rule."""
    return _spec([_full("x", [1, 5, 3, 3], 0, "uint8"),
                  _op("u", "aten.upsample_bicubic2d.default", [{"t": "x"}, [7, 1], False, None, scale],
                      [_meta([1, 5, 7, 1], "uint8")])], ["u"])


def _to_dtype(dtype) -> bytes:
    """break28b N4: a bare integer where the schema takes a dtype reached ATen as the enum's number."""
    return _spec([_full("x", [3], 1.0, "float32"),
                  _op("y", "aten.to.dtype", [{"t": "x"}, dtype, False, False], [_meta([3], "float16")])], ["y"])


def _nearest_u8(scale) -> bytes:
    """break28c P1: uint8 nearest with a 1e-19 scale (no scale rule for nearest): SIGSEGV."""
    return _spec([_full("x", [1, 1, 3, 3], 0, "uint8"),
                  _op("u", "aten.upsample_nearest2d.default", [{"t": "x"}, [3, 7], None, scale],
                      [_meta([1, 1, 3, 7], "uint8")])], ["u"])


def _bicubic_f64(scale) -> bytes:
    """break28c P2: float64 bicubic with 1e-30 scales (the scale rule was uint8's only): SIGSEGV."""
    return _spec([_full("x", [1, 64, 64, 64], 0.0, "float64"),
                  _op("u", "aten.upsample_bicubic2d.default", [{"t": "x"}, [64, 64], False, scale, scale],
                      [_meta([1, 64, 64, 64], "float64")])], ["u"])


def _grid3d(mode: int) -> bytes:
    """break28c P3: the 5-D grid_sampler with an unknown mode wrote nothing into its output (heap bytes back)."""
    return _spec([_full("x", [1, 1, 4, 4, 4], 0.0, "float32"), _full("g", [1, 1, 1, 64, 3], 0.0, "float32"),
                  _op("s", "aten.grid_sampler.default", [{"t": "x"}, {"t": "g"}, mode, 0, False],
                      [_meta([1, 1, 1, 1, 64])])], ["s"])


@pytest.fixture(scope="module")
def served():
    """One ``coinfer-edge serve`` process for the module's attacks (a trap that gets through kills it, and every
    later case fails too): (process, ``profile(spec)`` -> ProfileGraphResponse, ``hello()`` -> server version)."""
    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
    from tests.test_server_cli import running_server

    with running_server("--threads", "1") as (proc, address):
        ch = grpc.insecure_channel(address)
        stub = pbg.EdgeServiceStub(ch)

        def profile(s: bytes):
            return stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=s, iterations=1, warmup=0), timeout=60)

        def hello() -> str:
            return stub.Hello(pb.HelloRequest(client_version="t"), timeout=20).server_version

        yield proc, profile, hello
        ch.close()


@pytest.mark.parametrize("case, spec, words", [
    ("P1 nearest uint8 scale 1e-19", _nearest_u8(1e-19), "scales_w 1e-19 for 3 -> 7"),
    ("P2 bicubic float64 scale 1e-30", _bicubic_f64(1e-30), "scales_h 1e-30 for 64 -> 64"),
    ("P3 grid_sampler 5-D mode 9", _grid3d(9), "interpolation_mode 9; 0, 1 or 2"),
    ("F1 div trunc int64", _div("trunc"), "integer overflow: -9223372036854775808 / -1"),
    ("F1 div trunc int32", _div("trunc", "int32"), "integer overflow: -2147483648 / -1"),
    ("N1 div trunc, a 0-dim int64 wrapping", _div_wrapping(), "integer overflow: -2147483648 / -1 in torch.int32"),
    ("F2 avg_pool2d divisor -1", _pool(-1), "divisor_override -1 on torch.int64"),
    ("F3 bicubic uint8 scale 1e-20", _bicubic(1e-20), "scales_h 1e-20 for 3 -> 7"),
    ("N2 bicubic uint8 to 1 column, scale 1e-20", _bicubic_to_one(1e-20), "scales_w 1e-20 for 3 -> 1"),
    ("N4 to.dtype -1", _to_dtype(-1), "dtype -1 is not a dtype"),
])
def test_a_strangers_trap_is_refused_and_the_server_goes_on(served, case: str, spec: bytes, words: str) -> None:
    proc, profile, hello = served
    with pytest.raises(grpc.RpcError) as e:
        profile(spec)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, e.value.details())
    assert words in e.value.details(), e.value.details()
    assert proc.poll() is None, case
    assert hello()


def test_the_same_ops_with_what_eager_and_real_models_pass_still_run(served) -> None:
    proc, profile, hello = served
    for ok in (_div("floor"), _pool(2), _bicubic(None), _bicubic(7 / 3), _bicubic_to_one(0.4),
               _to_dtype({"dtype": "float16"}), _nearest_u8(7 / 3), _bicubic_f64(1.0), _grid3d(0)):
        assert profile(ok).ops
    assert proc.poll() is None and hello()


def test_a_training_mode_norm_writes_no_weight_of_a_clients_program() -> None:
    """F5: the server runs a client's ops on weights shared (by sha256) with every tenant that uploaded the same bytes;
    a training-mode batch norm or instance norm wrote its running statistics into them. Now they run on copies: the
    same outputs, the weights untouched."""
    from modelgraph.execute import Program
    from modelgraph.graph import OpNode
    from modelgraph.tensors import TensorMeta

    x = torch.randn(2, 4, 3)
    out = (TensorMeta.of(x), TensorMeta.of(torch.empty(4)), TensorMeta.of(torch.empty(4)))
    cases = [
        OpNode("bn", "aten.native_batch_norm.default",
               ({"t": "x"}, None, None, {"w": "rm"}, {"w": "rv"}, True, 1.0, 1e-5), {}, out, multi=True),
        OpNode("bn", "aten.batch_norm.default",
               ({"t": "x"}, None, None, {"w": "rm"}, {"w": "rv"}, True, 1.0, 1e-5, False), {}, out[:1]),
        OpNode("bn", "aten.instance_norm.default",
               ({"t": "x"}, None, None, {"w": "rm"}, {"w": "rv"}, True, 1.0, 1e-5, False), {}, out[:1]),
        # break28b L1: with use_input_stats false it writes them too (the values they hold: copied all the same)
        OpNode("bn", "aten.instance_norm.default",
               ({"t": "x"}, None, None, {"w": "rm"}, {"w": "rv"}, False, 1.0, 1e-5, False), {}, out[:1]),
    ]
    for op in cases:
        weights = {"rm": torch.zeros(4), "rv": torch.ones(4)}
        got = Program((op,), frozenset({"bn", "bn#0"})).run({"x": x}, weights)
        assert torch.equal(weights["rm"], torch.zeros(4)) and torch.equal(weights["rv"], torch.ones(4)), op.target
        eager_stats = {"rm": torch.zeros(4), "rv": torch.ones(4)}  # eager writes its own copies: same output
        want = Program((op,), frozenset({"bn", "bn#0"}), trusted=True).run({"x": x}, eager_stats)
        key = "bn#0" if op.multi else "bn"
        assert torch.equal(got[key], want[key]), op.target
        if op.args[5]:  # (what would have been written)
            assert not torch.equal(eager_stats["rm"], torch.zeros(4))


def test_splits_that_would_make_millions_of_tensors_are_refused_before_the_meta_kernel() -> None:
    """F7: ``unbind`` / ``split`` / ``chunk`` of a large tensor whose pieces the slice does not declare: the meta
    kernel built every piece (2^23 of them: 45 s, 7 GB) before the count was compared. Now refused first."""
    from modelgraph.errors import ShapeError
    from modelgraph.slice import SliceSpec, validate

    n = 1 << 22
    for target, extra in (("aten.unbind.int", [0]), ("aten.split.Tensor", [1]), ("aten.chunk.default", [n])):
        ops = [_full("x", [n], 0, "bool"), _op("s", target, [{"t": "x"}, *extra], [_meta([], "bool")], multi=True),
               _op("y", "aten.logical_not.default", [{"t": "s#0"}], [_meta([], "bool")])]
        spec = SliceSpec.from_json(json.dumps({"version": 1, "ops": ops, "inputs": {}, "outputs": ["y"],
                                               "weights": {}}))
        t = time.perf_counter()
        with pytest.raises(ShapeError, match=f"makes {n} tensors, the slice declares 1"):
            validate(spec)
        assert time.perf_counter() - t < 10, target


def test_an_rnn_of_more_layers_than_the_cap_is_refused_at_once() -> None:
    """F8: an LSTM of 32,768 layers (one weight ref repeated) held validation for 92 s, one layer's step at a time."""
    from modelgraph.allowlist import resolve
    from modelgraph.errors import ShapeError
    from modelgraph.kernel_shapes import MAX_RNN_LAYERS, checked_shapes

    def meta(*s):
        return torch.empty(*s, device="meta")

    layers = MAX_RNN_LAYERS + 1
    fn = checked_shapes("aten.gru.input", resolve("aten.gru.input"), "rnn")
    with pytest.raises(ShapeError, match=f"num_layers {layers}"):
        fn(meta(2, 1, 1), meta(layers, 1, 1), [meta(3, 1), meta(3, 1)] * layers, False, layers, 0.0, False, False,
           False)


def test_a_uint8_upsamplings_scratch_is_costed_and_a_huge_one_refused() -> None:
    """F6: uint8 bilinear / bicubic upsampling allocates N x max(C, 4) x H_in x W_out bytes between its passes, which
    the op budget did not count: a 489-byte slice took the server from 0.4 to 2.5 GB. Now the scratch is the op's
    workspace (refused over the per-op limit) and its work is counted; a model's uint8 resize still runs."""
    from edge_server.config import MiB, ServerConfig
    from edge_server.op_budget import estimate_op
    from edge_server.testing import ServerThread
    from modelgraph.graph import OpNode
    from modelgraph.tensors import TensorMeta
    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg

    def up(target, shape_in, shape_out, dtype="uint8"):
        x, y = TensorMeta(tuple(shape_in), dtype), TensorMeta(tuple(shape_out), dtype)
        op = OpNode("u", target, ({"t": "x"}, list(shape_out[2:]), False, None, None), {}, (y,))
        return estimate_op(op, [x, list(shape_out[2:]), False, None, None], {}, (y,), torch.device("cpu"))

    big = up("aten.upsample_bilinear2d.default", [1, 4, 262144, 1], [1, 4, 1, 2048])
    assert big.workspace_bytes == 4 * 262144 * 2048
    assert up("aten.upsample_bilinear2d.default", [1, 4, 262144, 1], [1, 4, 1, 2048], "float32").workspace_bytes == 0
    assert up("aten.upsample_bicubic2d.default", [1, 3, 8, 8], [1, 3, 16, 16]).workspace_bytes == 4 * 16 * 8

    def spec(shape_in, shape_out):
        return _spec([_full("x", shape_in, 0, "uint8"),
                      _op("u", "aten.upsample_bilinear2d.vec", [{"t": "x"}, shape_out[2:], False, None],
                          [_meta(shape_out, "uint8")])], ["u"])

    with ServerThread(config=ServerConfig(cache_bytes=8 * MiB, staging_bytes=8 * MiB, threads=1)) as srv:
        stub = pbg.EdgeServiceStub(grpc.insecure_channel(srv.address))
        with pytest.raises(grpc.RpcError) as e:
            stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec([1, 4, 1 << 20, 1], [1, 4, 1, 2048]),
                                                     iterations=1, warmup=0), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec([1, 3, 32, 32], [1, 3, 64, 64]),
                                                        iterations=1, warmup=0), timeout=60).ops
