"""The reference zoo: deterministic, loadable as specs, fully offloadable, and each synthetic model has
the graph shape it is named for."""

from __future__ import annotations

import pytest
import torch

from modelgraph import load_model
from modelgraph.allowlist import is_allowed
from modelgraph.zoo import SYNTHETIC, TRANSFORMERS, ZOO, spec


@pytest.fixture(scope="module")
def graphs(zoo_capture):
    return zoo_capture  # (module, inputs, graph) per zoo name, captured once per session (conftest)


def test_registry():
    assert set(SYNTHETIC) | set(TRANSFORMERS) == set(ZOO)
    assert set(SYNTHETIC) >= {"chain", "diamond", "fanout", "shared_weights", "multi_io"}
    assert spec("chain") == "modelgraph.zoo:chain"
    with pytest.raises(KeyError, match="no zoo model 'nope'"):
        spec("nope")


@pytest.mark.parametrize("name", list(ZOO))
def test_deterministic_and_loadable_as_spec(name):
    (m1, x1), (m2, x2) = ZOO[name](), ZOO[name]()
    torch.manual_seed(1234)  # the global RNG state must not matter
    lm = load_model(spec(name), seed=99)
    for m in (m2, lm.module):
        s1, s2 = m1.state_dict(), m.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    for xs in (x2, lm.example_inputs):
        assert len(xs) == len(x1) and all(torch.equal(a, b) for a, b in zip(x1, xs))
    assert not m1.training and not lm.module.training
    with torch.no_grad():
        out = m1(*x1)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(o).all() and o.abs().sum() > 0 for o in outs)


@pytest.mark.parametrize("name", list(ZOO))
def test_every_op_is_offloadable(graphs, name):
    _, _, g = graphs(name)
    off = [op.target for op in g.ops if not is_allowed(op.target)]
    assert off == []


def test_chain_is_a_chain(graphs):
    g = graphs("chain")[2]
    assert all(len(g.consumers.get(r, ())) <= 1 for op in g.ops for r in op.output_refs())


def test_diamond_merges_two_branches(graphs):
    g = graphs("diamond")[2]
    adds = [op for op in g.ops if op.target == "aten.add.Tensor"]
    assert len(adds) == 1 and len(adds[0].tensor_inputs) == 2
    assert max(len(c) for c in g.consumers.values()) >= 2


def test_fanout_has_a_wide_fanout_merged_by_cat(graphs):
    g = graphs("fanout")[2]
    assert max(len(c) for c in g.consumers.values()) >= 4
    cat = next(op for op in g.ops if op.target == "aten.cat.default")
    assert len(cat.tensor_inputs) == 4


def test_shared_weights_are_tied(graphs):
    module, _, g = graphs("shared_weights")
    assert module.tied.weight is module.fc.weight
    reads = [w for op in g.ops for w in op.weight_inputs]
    conv_w = "conv.weight"
    assert reads.count(conv_w) == 2
    fc_w = next(w for w in g.weights if w in ("fc.weight", "tied.weight"))
    assert reads.count(fc_w) == 3 and not ({"fc.weight", "tied.weight"} <= set(g.weights))


def test_multi_io_has_two_inputs_and_two_outputs(graphs):
    module, inputs, g = graphs("multi_io")
    assert len(inputs) == 2 and len(g.inputs) == 2 and len(g.outputs) == 2
    with torch.no_grad():
        out = module(*inputs)
    assert isinstance(out, tuple) and [tuple(o.shape) for o in out] == [(1, 5), (1, 2)]


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_vits_use_attention_and_strided_views(graphs, name):
    _, _, g = graphs(name)
    targets = {op.target for op in g.ops}
    assert {"aten.scaled_dot_product_attention.default", "aten.layer_norm.default", "aten.gelu.default"} <= targets
    assert any(m.stride is not None for op in g.ops for m in op.outputs)
