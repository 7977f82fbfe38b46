"""break32 G3 (session 30): an op's arguments given by name where the server's checks read them by position.

``edge_server.op_budget`` read an op's first argument as ``args[0]`` or ``kwargs["self"]``; ``dropout`` and
``feature_dropout`` name theirs ``input``, so ``dropout(input=view, train=False)`` (which returns the view itself)
left the alias groups: 4 x (an 8 MiB ``full``, a 1-element ``narrow``, that dropout) then a ``cat`` held 32 MiB
against an estimate of 8 (against a server: a 3.8 KB spec took it from 417 to 1185 MiB of RSS under
``--memory-mb 1024``, answered OK). The same reading of a ``.vec`` upsampling's first argument (``input``) skipped
its uint8 scratch rule (break28 F6), and ``mm`` / ``conv2d`` / ``linear`` by name raised IndexError in the cost rules.
Now the slice parser puts every allowlisted call in positional form (``modelgraph.allowlist.positional_form``), so
each check sees one form of the call.
"""

from __future__ import annotations

import pytest

from edge_server.slices import compile_slice
from modelgraph import SliceSpec
from modelgraph.allowlist import positional_form
from tests.test_break31 import MiB, _full, _json, _meta, _op, _t, held_bytes

N = 2 * MiB  # float32 elements: 8 MiB


def _views_through(make) -> bytes:
    """4 x (an 8 MiB ``full``, a 1-element ``narrow`` of it, ``make(i)`` of that view), then a ``cat`` of the four."""
    ops = []
    for i in range(4):
        ops += [_full(f"x{i}", [N]), _op(f"v{i}", "aten.narrow.default", [_t(f"x{i}"), 0, 0, 1], [_meta([1])]), make(i)]
    ops.append(_op("c", "aten.cat.default", [[_t(f"d{i}") for i in range(4)]], [_meta([4])]))
    return _json(ops, ["c"])


CALLS = {
    "dropout_by_name": lambda i: _op(f"d{i}", "aten.dropout.default", [], [_meta([1])],
                                     {"input": _t(f"v{i}"), "p": 0.5, "train": False}),
    "feature_dropout_by_name": lambda i: _op(f"d{i}", "aten.feature_dropout.default", [], [_meta([1])],
                                             {"input": _t(f"v{i}"), "p": 0.5, "train": False}),
    "dropout_mixed": lambda i: _op(f"d{i}", "aten.dropout.default", [_t(f"v{i}")], [_meta([1])],
                                   {"p": 0.5, "train": False}),
    "narrow_by_name": lambda i: _op(f"d{i}", "aten.narrow.default", [], [_meta([1])],
                                    {"self": _t(f"v{i}"), "dim": 0, "start": 0, "length": 1}),
    "dropout_positional": lambda i: _op(f"d{i}", "aten.dropout.default", [_t(f"v{i}"), 0.5, False], [_meta([1])]),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_an_alias_given_by_name_keeps_its_base_in_the_estimate(call: str) -> None:
    estimate, held = held_bytes(_views_through(CALLS[call]))
    assert held >= 4 * N * 4  # every base is held to the cat
    assert estimate >= held


def _upsample(by_name: bool) -> bytes:
    """break28 F6's uint8 bilinear upsampling (its separable pass's intermediate is the scratch), as ``.vec``."""
    x = {"name": "x", "target": "aten.full.default", "args": [[1, 4, 1024, 1], 1],
         "kwargs": {"dtype": {"dtype": "uint8"}}, "outputs": [_meta([1, 4, 1024, 1], "uint8")]}
    args = {"input": _t("x"), "output_size": [1, 512], "align_corners": False, "scale_factors": None}
    up = _op("u", "aten.upsample_bilinear2d.vec", [] if by_name else list(args.values()),
             [_meta([1, 4, 1, 512], "uint8")], args if by_name else {})
    return _json([x, up], ["u"])


def test_a_uint8_upsampling_given_by_name_is_costed_its_scratch() -> None:
    positional = compile_slice(_upsample(False), require_hashes=False).cost
    named = compile_slice(_upsample(True), require_hashes=False).cost
    assert named.peak_bytes == positional.peak_bytes
    assert positional.peak_bytes >= 4 * 1024 * 512  # the intermediate: input rows x output columns per channel


@pytest.mark.parametrize("target,names", [
    ("aten.mm.default", ("self", "mat2")),
    ("aten.linear.default", ("input", "weight")),
])
def test_a_matmul_given_by_name_compiles_with_the_positional_cost(target: str, names: tuple[str, str]) -> None:
    def spec(by_name: bool) -> bytes:
        refs = [_t("a"), _t("b")]
        op = _op("c", target, [] if by_name else refs, [_meta([256, 256])], dict(zip(names, refs)) if by_name else {})
        return _json([_full("a", [256, 256]), _full("b", [256, 256]), op], ["c"])

    assert compile_slice(spec(True), require_hashes=False).cost == compile_slice(spec(False), require_hashes=False).cost


def test_positional_form_moves_only_what_follows_without_a_gap() -> None:
    t = "aten.dropout.default"
    assert positional_form(t, (), {"input": 1, "p": 0.5, "train": False}) == ((1, 0.5, False), {})
    assert positional_form(t, (1,), {"train": False}) == ((1,), {"train": False})  # p left to its default: a gap
    assert positional_form(t, (1,), {"input": 2}) == ((1,), {"input": 2})  # given twice: the kernel refuses it
    full = "aten.full.default"
    assert positional_form(full, ([2], 1.0), {"dtype": 6}) == (([2], 1.0), {"dtype": 6})  # keyword-only stays
    assert positional_form("aten.not_an_op.default", (), {"self": 1}) == ((), {"self": 1})


def test_the_parsed_spec_holds_the_positional_form() -> None:
    spec = SliceSpec.from_json(_views_through(CALLS["dropout_by_name"]).decode())
    op = next(o for o in spec.ops if o.name == "d0")
    assert len(op.args) == 3 and not op.kwargs
