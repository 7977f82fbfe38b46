"""A server must refuse a bad slice with a typed error naming the problem, before anything runs.

Every case starts from a valid blob (the chain model's full server part, checked to run bitwise in
``test_valid_blob_runs``), changes one thing, and asserts the error class, the message, and that no
real (non-meta) tensor was computed while decoding and validating.
"""

from __future__ import annotations

import builtins
import copy
import json
import pickle
import struct

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modelgraph import (
    CycleError,
    DanglingReferenceError,
    Limits,
    MalformedSliceError,
    OpExecutionError,
    OpNotAllowedError,
    ShapeError,
    SliceError,
    SliceProgram,
    SliceSpec,
    TensorMeta,
    WeightIntegrityError,
    capture,
    decode_slice,
    encode_slice,
    make_slice,
    tensor_bytes,
    tensor_from_bytes,
    validate,
)
from modelgraph.slice import MAGIC
from modelgraph.zoo import chain, multi_io


class RealCompute(TorchDispatchMode):
    """Records every ATen call that produces a non-empty tensor outside the meta device (views,
    such as decode_slice's zero-copy weight views, allocate and compute nothing: not recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        outs = out if isinstance(out, tuple | list) else (out,)
        if any(isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() > 0 for t in outs):
            self.calls.append(str(func))
        return out


@pytest.fixture(scope="module")
def chain_slice():
    module, inputs = chain()
    g = capture(module, inputs, name="chain")
    spec = make_slice(g, g.split_at(0))
    with torch.no_grad():
        ref = module(*inputs)
    wbytes = b"".join(bytes(tensor_bytes(g.weight_values[n])) for n in spec.weights)
    return g, spec, wbytes, inputs, ref


def assemble(header: dict | bytes, wbytes: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<Q", len(h)) + h + wbytes


def load(blob: bytes, limits: Limits | None = None) -> tuple[SliceProgram, dict]:
    spec, weights = decode_slice(blob)
    return SliceProgram(spec, limits=limits), weights


def rejects(blob: bytes, cls: type[Exception], match: str, limits: Limits | None = None) -> SliceError:
    mode = RealCompute()
    with mode, pytest.raises(cls, match=match) as info:
        load(blob, limits)
    assert mode.calls == [], f"ran real ops before rejecting: {mode.calls[:5]}"
    return info.value


def test_valid_blob_runs(chain_slice):
    g, spec, wbytes, inputs, ref = chain_slice
    blob = assemble(spec.to_dict(), wbytes)
    assert blob == encode_slice(spec, g.weight_values)
    mode = RealCompute()
    with mode:
        prog, weights = load(blob)
    assert mode.calls == []  # validation is meta-only for a real slice too
    out = prog.run({"x": inputs[0]}, weights)
    torch.testing.assert_close(out[g.outputs[0]], ref, rtol=0, atol=0)


# ---- one change each: (name, mutate(header, weight_bytes) -> (header, weight_bytes), error, message) ----
def _op(d: dict, i: int = 0) -> dict:
    return d["ops"][i]


def _set(path_fn, value):
    def mutate(d, w):
        path_fn(d, value)
        return d, w
    return mutate


def _arg0(d, v):
    _op(d)["args"][0] = v


def _arg1(d, v):
    _op(d)["args"][1] = v


def _flip(d, w):
    b = bytearray(w)
    b[len(b) // 2] ^= 0x01
    return d, bytes(b)


def _cycle(d, w):
    _op(d, 0)["args"][0] = {"t": "relu"}  # conv2d reads relu, relu reads conv2d
    return d, w


def _self_cycle(d, w):
    _op(d, 1)["args"][0] = {"t": "relu"}
    return d, w


def _shape_mismatch(d, w):
    entry = d["weights"]["conv1.weight"]
    entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
    return d, w


def _deep(d, w):
    v: object = 1
    for _ in range(20):
        v = [v]
    _op(d)["args"].append(v)
    return d, w


CASES = [
    ("from_file", _set(lambda d, v: _op(d).__setitem__("target", v), "aten.from_file.default"),
     OpNotAllowedError, r"'aten\.from_file\.default' is not on the server's allowlist"),
    ("made_up_op", _set(lambda d, v: _op(d).__setitem__("target", v), "aten.rm_rf.default"),
     OpNotAllowedError, r"'aten\.rm_rf\.default' is not on"),
    ("python_callable", _set(lambda d, v: _op(d).__setitem__("target", v), "os.system"),
     OpNotAllowedError, r"'os\.system' is not on"),
    ("dangling_tensor", _set(_arg0, {"t": "ghost"}), DanglingReferenceError, r"reads tensor 'ghost', which nothing"),
    ("dangling_weight", _set(_arg1, {"w": "ghost.weight"}), DanglingReferenceError,
     r"reads weight 'ghost.weight', not in the manifest"),
    ("dangling_output", _set(lambda d, v: d.__setitem__("outputs", v), ["ghost_out"]), DanglingReferenceError,
     r"output 'ghost_out' names no op output"),
    ("tuple_index_on_single_output", _set(_arg0, {"t": "x#3"}), DanglingReferenceError, r"'x#3'"),
    ("cycle", _cycle, CycleError, r"cycle: .*conv2d.*relu|cycle: .*relu.*conv2d"),
    ("self_cycle", _self_cycle, CycleError, r"cycle: relu -> relu"),
    ("negative_dim", _set(lambda d, v: _op(d)["outputs"][0].__setitem__("shape", v), [1, -8, 32, 32]),
     ShapeError, r"absurd dimension -8"),
    ("giant_dim", _set(lambda d, v: d["inputs"]["x"].__setitem__("shape", v), [1, 3, 1 << 40, 32]),
     ShapeError, r"absurd dimension 1099511627776"),
    ("over_tensor_limit", _set(lambda d, v: _op(d)["outputs"][0].__setitem__("shape", v), [1 << 20, 1 << 20]),
     ShapeError, r"op conv2d declares 4398046511104 bytes .*per-tensor limit"),
    ("rank", _set(lambda d, v: d["inputs"]["x"].__setitem__("shape", v), [1] * 17), ShapeError, r"rank 17 exceeds"),
    ("unknown_dtype", _set(lambda d, v: d["inputs"]["x"].__setitem__("dtype", v), "float128"),
     ShapeError, r"unknown dtype 'float128'"),
    ("float_shape", _set(lambda d, v: d["inputs"]["x"].__setitem__("shape", v), [1, 3, 32.5, 32]),
     ShapeError, r"shape entries must be integers"),
    ("wrong_declared_output", _set(lambda d, v: _op(d)["outputs"][0].__setitem__("shape", v), [1, 8, 16, 64]),
     ShapeError, r"op 'conv2d' output 0 is \[1, 8, 32, 32\] torch.float32, declared \[1, 8, 16, 64\]"),
    ("bad_sha_bytes", _flip, WeightIntegrityError, r"weight '.*': sha256 [0-9a-f]+\.\.\. does not match manifest"),
    ("bad_sha_header", _set(lambda d, v: d["weights"]["fc.bias"].__setitem__("sha256", v), "0" * 64),
     WeightIntegrityError, r"weight 'fc.bias': sha256 .* does not match manifest 0000"),
    ("short_weights", lambda d, w: (d, w[:-4]), WeightIntegrityError, r"weight 'fc.bias': blob ends after 36 of 40"),
    ("trailing_bytes", lambda d, w: (d, w + b"\0" * 8), WeightIntegrityError, r"8 trailing bytes"),
    ("shape_vs_bytes", _shape_mismatch, WeightIntegrityError, r"sha256|blob ends|trailing"),
    ("non_json_arg", _set(_arg0, {"py": "os.system('rm -rf /')"}), MalformedSliceError,
     r"unrecognised argument encoding \{'py'"),
    ("ref_not_a_string", _set(_arg0, {"t": 5}), MalformedSliceError, r"unrecognised argument encoding \{'t': 5\}"),
    ("two_key_arg", _set(_arg0, {"t": "x", "w": "fc.bias"}), MalformedSliceError, r"unrecognised argument encoding"),
    ("dtype_attr", _set(_arg1, {"dtype": "__class__"}), MalformedSliceError, r"unrecognised argument encoding"),
    ("deep_nesting", _deep, MalformedSliceError, r"nesting too deep"),
    # JSON booleans where integers are expected (True == 1 to Python; issue-12 session 13)
    ("bool_shape", _set(lambda d, v: d["inputs"]["x"].__setitem__("shape", v), [True, 3, 32, 32]),
     ShapeError, r"shape entries must be integers"),
    ("bool_stride", _set(lambda d, v: d["inputs"]["x"].update(stride=v), [3072, 1024, 32, True]),
     ShapeError, r"stride entries must be integers"),
    ("version_true", _set(lambda d, v: d.__setitem__("version", v), True), MalformedSliceError,
     r"unsupported slice format version True"),
    ("multi_not_bool", _set(lambda d, v: _op(d).__setitem__("multi", v), "no"), MalformedSliceError,
     r"op 'conv2d': multi must be true or false"),
    ("version_2", _set(lambda d, v: d.__setitem__("version", v), 2), MalformedSliceError,
     r"unsupported slice format version 2 \(this side speaks 1\)"),
    ("version_missing", lambda d, w: ({k: v for k, v in d.items() if k != "version"}, w), MalformedSliceError,
     r"unsupported slice format version None"),
    ("version_string", _set(lambda d, v: d.__setitem__("version", v), "1"), MalformedSliceError,
     r"unsupported slice format version '1'"),
    ("ops_not_list", _set(lambda d, v: d.__setitem__("ops", v), {"a": 1}), MalformedSliceError, r"needs ops \(list\)"),
    ("outputs_not_names", _set(lambda d, v: d.__setitem__("outputs", v), [1]), MalformedSliceError,
     r"outputs \(list of names\)"),
    ("op_without_target", lambda d, w: (d, w) if _op(d).pop("target") else None, MalformedSliceError,
     r"op #0 is malformed"),
    ("args_not_list", _set(lambda d, v: _op(d).__setitem__("args", v), {"0": {"t": "x"}}), MalformedSliceError,
     r"op #0 is malformed"),
    ("op_without_outputs", _set(lambda d, v: _op(d).__setitem__("outputs", v), []), MalformedSliceError,
     r"op #0 is malformed"),
    ("duplicate_op", lambda d, w: (d, w) if _op(d, 1).__setitem__("name", "conv2d") is None else None,
     MalformedSliceError, r"duplicate op name 'conv2d'"),
    ("weight_entry_not_object", _set(lambda d, v: d["weights"].__setitem__("fc.bias", v), [10]), MalformedSliceError,
     r"weight 'fc.bias': sha256 must be a hex string"),
]


@pytest.mark.parametrize("mutate,cls,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_slice_is_rejected_before_running(chain_slice, mutate, cls, match):
    _, spec, wbytes, _, _ = chain_slice
    d, w = mutate(copy.deepcopy(spec.to_dict()), wbytes)
    rejects(assemble(d, w), cls, match)


@pytest.mark.parametrize("header,match", [
    (b"{not json", r"not valid JSON"),
    (b"\xff\xfe\x00", r"not valid JSON"),
    (b"[1, 2]", r"must be a JSON object"),
    (b'"a string"', r"must be a JSON object"),
])
def test_malformed_header(chain_slice, header, match):
    rejects(assemble(header, chain_slice[2]), MalformedSliceError, match)


def test_bad_framing(chain_slice):
    _, spec, wbytes, _, _ = chain_slice
    good = assemble(spec.to_dict(), wbytes)
    rejects(b"PICKLE!!" + good[8:], MalformedSliceError, r"bad magic")
    rejects(MAGIC + b"\x01", MalformedSliceError, r"bad magic")
    too_long = MAGIC + struct.pack("<Q", len(good)) + good[16:]
    rejects(too_long, MalformedSliceError, r"header length \d+ exceeds the blob")
    rejects(b"", MalformedSliceError, r"bad magic")


def test_memory_limits(chain_slice):
    _, spec, wbytes, _, _ = chain_slice
    blob = assemble(spec.to_dict(), wbytes)
    need = spec.weight_bytes + sum(m.nbytes for m in spec.inputs.values()) + \
        sum(m.nbytes for op in spec.ops for m in op.outputs)
    load(blob, Limits(max_total_bytes=need))  # exactly enough is fine
    rejects(blob, ShapeError, rf"slice would need {need} bytes of tensors; the limit is {need - 1}",
            Limits(max_total_bytes=need - 1))
    biggest = max(m.nbytes for op in spec.ops for m in op.outputs)
    rejects(blob, ShapeError, rf"per-tensor limit is {biggest - 1}", Limits(max_tensor_bytes=biggest - 1))


def test_tensor_bytes_must_match_dtype_times_shape():
    meta = TensorMeta((2, 3), "float32")
    assert tensor_from_bytes(bytes(24), meta).shape == (2, 3)
    with pytest.raises(WeightIntegrityError, match=r"20 bytes do not match dtype float32 x shape \[2, 3\] = 24"):
        tensor_from_bytes(bytes(20), meta)
    with pytest.raises(WeightIntegrityError, match=r"48 bytes do not match"):
        tensor_from_bytes(bytes(48), meta)


def test_prepare_input_checks_received_tensors(chain_slice):
    _, spec, wbytes, inputs, _ = chain_slice
    prog, weights = load(assemble(spec.to_dict(), wbytes))
    with pytest.raises(ShapeError, match=r"input 'x' is \[1, 3, 16, 16\]"):
        prog.run({"x": torch.zeros(1, 3, 16, 16)}, weights)
    with pytest.raises(ShapeError, match=r"expected \[1, 3, 32, 32\] float32"):
        prog.run({"x": inputs[0].double()}, weights)
    with pytest.raises(DanglingReferenceError, match=r"'y' is not an input of this slice"):
        prog.run({"x": inputs[0], "y": inputs[0]}, weights)
    with pytest.raises(DanglingReferenceError, match=r"missing cut tensors: \['x'\]"):
        prog.run({}, weights)


def test_decode_never_unpickles(chain_slice, monkeypatch):
    """No pickle, no torch.load, no eval/exec anywhere on the server's path from bytes to outputs."""
    g, spec, wbytes, inputs, ref = chain_slice
    blob = assemble(spec.to_dict(), wbytes)

    def forbidden(*a, **k):
        raise AssertionError("the server must not unpickle or evaluate client data")

    for mod, attr in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                      (builtins, "eval"), (builtins, "exec")]:
        monkeypatch.setattr(mod, attr, forbidden)
    spec2, weights = decode_slice(blob)
    out = SliceProgram(spec2).run({"x": inputs[0]}, weights)
    monkeypatch.undo()
    torch.testing.assert_close(out[g.outputs[0]], ref, rtol=0, atol=0)


def test_spec_round_trips_through_json(chain_slice):
    _, spec, _, _, _ = chain_slice
    again = SliceSpec.from_json(spec.to_json())
    assert again.to_dict() == spec.to_dict() and again.graph_hash == spec.graph_hash
    module, inputs = multi_io()
    g = capture(module, inputs)
    s = make_slice(g, g.split_at(3))
    assert SliceSpec.from_json(s.to_json()).to_dict() == s.to_dict()


def test_weights_are_zero_copy_views_of_the_blob(chain_slice):
    g, spec, wbytes, _, _ = chain_slice
    blob = bytearray(assemble(spec.to_dict(), wbytes))
    _, weights = decode_slice(blob, verify=False, align=False)
    w = weights["fc.bias"]
    blob[-1] ^= 0xFF  # the last byte of the last weight (fc.bias) changes under the view
    assert not torch.equal(w, g.weight_values["fc.bias"])
    _, aligned = decode_slice(blob, verify=False)  # the default: every weight 64-byte aligned, same values
    assert all(t.data_ptr() % 64 == 0 for t in aligned.values())
    assert all(torch.equal(aligned[k], weights[k]) for k in weights)


# ---- regressions for gaps found by these tests (fixed in df09486) ----------------------------------------
@pytest.mark.parametrize("stride,match", [
    ([1 << 31, 1], r"input x declares stride \[2147483648, 1\] spanning \d+ bytes; the per-tensor limit is 1048576"),
    ([-4, 1], r"absurd stride \[-4, 1\]"),
    ([1 << 40, 1], r"absurd stride"),
], ids=["huge_stride", "negative_stride", "giant_stride"])
def test_strides_are_bounded(stride, match):
    """A declared stride must not imply storage beyond the limit (restore_layout allocates it)."""
    with pytest.raises(ShapeError, match=match):
        validate(SliceSpec.from_dict({
            "version": 1, "model_hash": "", "outputs": ["r"], "weights": {},
            "inputs": {"x": {"shape": [2, 4], "dtype": "float32", "stride": stride}},
            "ops": [{"name": "r", "target": "aten.relu.default", "args": [{"t": "x"}], "kwargs": {},
                     "outputs": [{"shape": [2, 4], "dtype": "float32"}]}],
        }), Limits(max_tensor_bytes=1 << 20))


def test_weight_dtype_lie_gives_a_typed_error(chain_slice):
    """meta conv2d does not check dtypes, so validation passes; the run must fail typed, naming the op."""
    _, spec, wbytes, inputs, _ = chain_slice
    d = copy.deepcopy(spec.to_dict())
    d["weights"]["conv1.weight"]["dtype"] = "int32"  # same byte count, same sha256: only the types can catch it
    prog, weights = load(assemble(d, wbytes))
    with pytest.raises(OpExecutionError, match=r"op 'conv2d' \(aten.conv2d.default\) failed: RuntimeError"):
        prog.run({"x": inputs[0]}, weights)


def test_validation_allocates_nothing_for_factory_ops():
    """Factory ops without a device argument must not allocate for real while being validated."""
    spec = SliceSpec.from_dict({
        "version": 1, "model_hash": "", "outputs": ["f"], "weights": {}, "inputs": {},
        "ops": [{"name": "f", "target": "aten.full.default", "args": [[512, 512], 1.0], "kwargs": {},
                 "outputs": [{"shape": [1], "dtype": "float32"}]}],  # declared tiny, really 1 MiB
    })
    mode = RealCompute()
    with mode, pytest.raises(ShapeError):
        validate(spec)
    assert mode.calls == []
