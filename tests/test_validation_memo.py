"""Slice validation's memo (issue 11: 20k chained ops validate in under 1 s) against what it replaces.

Shape propagation runs each distinct call's meta kernel once: the key is the op's target, its call
skeleton (``argcodec.analyse``: the decoded arguments with type-tagged scalars and each reference replaced
by its slot) and the signature of the tensor at each slot. Here, on server slices of the capture zoo
(``modelgraph.zoo`` and the users' models of ``tests/user_zoo.py``, several cut points each), the memoised
propagation gives exactly the signatures of one meta-kernel run per op, ``analyse`` decodes exactly as
``decode``/``refs``, and calls that differ only in a scalar's type or in aliasing are not merged.
"""

from __future__ import annotations

import json

import pytest

from edge_server.slices import SliceRejected, compile_slice
from modelgraph import capture, load_model, make_slice
from modelgraph import slice as mgslice
from modelgraph.allowlist import is_allowed
from modelgraph.argcodec import TensorRef, WeightRef, analyse, decode, refs
from modelgraph.slice import SliceSpec, validate
from modelgraph.tracelock import TORCH_TRACE_LOCK
from modelgraph.zoo import ZOO
from tests import user_zoo

# default run: a model of each kind (chain, DAG, transformer blocks, strided inputs, int inputs, a top-k
# tail, slice writes, an LSTM, float64); the slow run adds the rest of both zoos
DEFAULT = [
    "chain",
    "diamond",
    "tiny_vit",
    "channels_last",
    "noncontig",
    "int_input",
    "topk_tail",
    "slice_write",
    "lstm",
    "float64",
]
ALL = [*ZOO, *(n for n, kind in user_zoo.KINDS.items() if kind == "runs")]
REST = [n for n in ALL if n not in DEFAULT]


def _graph(name: str, zoo_capture=None):
    if name in ZOO and zoo_capture is not None:
        return zoo_capture(name)[2]  # captured once per session (conftest), read only here
    if name in ZOO:
        module, inputs = ZOO[name]()
    else:
        lm = load_model(user_zoo.spec(name))
        module, inputs = lm.module, lm.example_inputs
    return capture(module, inputs, name=name)


def _server_slices(g) -> list[bytes]:
    """The server slice at five cut points (everything, and from 1/4, 1/2, 3/4 and the last op on), as the
    UE sends it; slices with an op off the allowlist (a pinned tail) are left out."""
    n = len(g.ops)
    out = []
    for k in sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}):
        split = g.split_at(k)
        if all(is_allowed(g.op_by_name[o].target) for o in split.server_order):
            out.append(make_slice(g, split, with_hashes=False).to_json().encode())
    return out


def _check_model(name: str, zoo_capture=None) -> tuple[int, int]:
    """Every slice of ``name``: compiles on the server's path, and the memoised propagation equals the
    uncached one ref by ref. Returns (meta-kernel runs memoised, runs uncached) over its slices."""
    g = _graph(name, zoo_capture)
    for op in g.ops:  # one walk gives what decode + refs give
        form = analyse(op.args, op.kwargs)
        a, k = decode(list(op.args)), {key: decode(v) for key, v in op.kwargs.items()}
        assert (form.args, form.kwargs) == (a, k)
        assert form.refs == tuple(refs([a, k]))
        assert form.tensors == tuple(dict.fromkeys(r.name for r in form.refs if type(r) is TensorRef))
        assert form.weights == tuple(dict.fromkeys(r.name for r in form.refs if type(r) is WeightRef))
    bodies = _server_slices(g)
    assert bodies, f"{name}: no server slice to check"
    runs = [0, 0]
    real = mgslice._meta_call
    for body in bodies:
        cs = compile_slice(body, require_hashes=False)  # the server's path: parse, validate, estimate
        assert len(cs.order) == len(json.loads(body)["ops"])
        spec = SliceSpec.from_json(body)
        order = validate(spec)
        got = []
        for i, memoize in enumerate((True, False)):

            def counting(*a, i=i, **kw):
                runs[i] += 1
                return real(*a, **kw)

            mgslice._meta_call = counting
            try:
                with TORCH_TRACE_LOCK:
                    got.append(mgslice._propagate_meta(spec, order, memoize=memoize))
            finally:
                mgslice._meta_call = real
        assert got[0] == got[1], f"{name}: memoised shape propagation differs from one run per op"
    return runs[0], runs[1]


@pytest.mark.parametrize("name", DEFAULT)
def test_memo_equals_uncached_propagation(name: str, zoo_capture) -> None:
    memoised, uncached = _check_model(name, zoo_capture)
    assert 0 < memoised <= uncached
    if name == "tiny_vit":  # identical transformer blocks: the memo must actually be used
        assert memoised < uncached


@pytest.mark.slow
@pytest.mark.parametrize("name", REST)
def test_memo_equals_uncached_propagation_rest_of_zoo(name: str, zoo_capture) -> None:
    memoised, uncached = _check_model(name, zoo_capture)
    assert 0 < memoised <= uncached


def _spec(ops, inputs) -> bytes:
    return json.dumps(
        {"version": 1, "ops": ops, "inputs": inputs, "outputs": [ops[-1]["name"]], "weights": {}}
    ).encode()


def _op(name, target, args, dtype, shape=(2, 3)):
    return {
        "name": name,
        "target": target,
        "args": args,
        "kwargs": {},
        "outputs": [{"shape": list(shape), "dtype": dtype}],
    }


def test_scalar_types_are_part_of_the_key() -> None:
    """int64 x 2 is int64, int64 x 2.0 is float32: a memo that took 2 and 2.0 for one call would give the
    second op the first one's dtype (and accept a wrong declaration)."""
    x = {"x": {"shape": [2, 3], "dtype": "int64"}}
    ok = [
        _op("a", "aten.mul.Tensor", [{"t": "x"}, 2], "int64"),
        _op("b", "aten.mul.Tensor", [{"t": "x"}, 2.0], "float32"),
        _op("c", "aten.add.Tensor", [{"t": "a"}, {"t": "b"}], "float32"),
    ]
    compile_slice(_spec(ok, x), require_hashes=False)
    wrong = [ok[0], _op("b", "aten.mul.Tensor", [{"t": "x"}, 2.0], "int64")]
    with pytest.raises(SliceRejected, match=r"ShapeError: op 'b' output 0 is .* torch.float32, declared"):
        compile_slice(_spec(wrong, x), require_hashes=False)
    # the reverse order: the float call first
    wrong = [
        _op("b", "aten.mul.Tensor", [{"t": "x"}, 2.0], "float32"),
        _op("a", "aten.mul.Tensor", [{"t": "x"}, 2], "float32"),
    ]
    with pytest.raises(SliceRejected, match=r"ShapeError: op 'a' output 0 is .* torch.int64, declared"):
        compile_slice(_spec(wrong, x), require_hashes=False)


def test_aliasing_and_booleans_are_part_of_the_key() -> None:
    """add(x, x) and add(x, y) of equal tensors are two calls, and so are mul(x, 1) and mul(x, True)."""
    f = {"shape": [2, 3], "dtype": "float32"}
    ops = [
        _op("a", "aten.add.Tensor", [{"t": "x"}, {"t": "x"}], "float32"),
        _op("b", "aten.add.Tensor", [{"t": "x"}, {"t": "y"}], "float32"),
        _op("c", "aten.add.Tensor", [{"t": "x"}, {"t": "y"}], "float32"),  # a repeat of b: no run
        _op("d", "aten.mul.Tensor", [{"t": "c"}, 1], "float32"),
        _op("e", "aten.mul.Tensor", [{"t": "d"}, True], "float32"),
    ]
    calls = []
    real = mgslice._meta_call
    mgslice._meta_call = lambda op, *a, **kw: (calls.append(op.name), real(op, *a, **kw))[1]
    try:
        compile_slice(_spec(ops, {"x": f, "y": f}), require_hashes=False)
    finally:
        mgslice._meta_call = real
    assert calls == ["a", "b", "d", "e"]
