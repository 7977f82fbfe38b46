"""Session 17's user models (``tests/user_models17.py``) through a real edge server (port 0, one per module):
several fixed partitions each, cold (the request uploads its weights) and warm (fresh inputs, then the example
again), every answer compared with the user's own eager ``module(*args, **kwargs)``: the output's classes (a
registered dataclass, ``OrderedDict`` in its key order, namedtuple), structure, dtypes, shapes, strides, and
values bit for bit against the captured graph (``c.reference``) and within ``TOLERANCES`` of eager.

Also: a call whose inputs have another memory layout than the example's (channels_last, an HWC image permuted
to NCHW, a slice) answers eager's output layout (before: the layout captured with the example), and
``last_report`` after a call that raised is None (before: the previous request's report).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_map

from modelgraph.pinning import pin_off_allowlist
from tests import user_models17 as um
from tests.test_user_zoo_splits import FAST, assert_as_eager
from ue_client import CoinferClient, InputError, new_tenant


def _eager(module, args, kwargs):
    with torch.no_grad():
        return module(*args, **kwargs)


def _fresh(tree, seed: int):
    """New values for the floating tensors of ``tree`` (integer and bool inputs, ids and masks, kept)."""
    g = torch.Generator().manual_seed(seed)
    return tree_map(lambda t: torch.empty_like(t).copy_(torch.randn(t.shape, generator=g))  # t's own layout
                    if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


_BUILT: dict[str, tuple] = {}


def _model(name: str):
    """(module, args, kwargs, captured graph, head) of a model, captured once per test process (the clients
    below are built on the graph: one capture and eager check per model); ``head``: the positions of the ops the
    server may run (not pinned to the UE, ``modelgraph.pinning``), where a cut leaves the server some work."""
    if name not in _BUILT:
        m, a, k = um.MODELS[name]()
        g = CoinferClient(m, a, example_kwargs=k, name=name).graph
        tail = set(pin_off_allowlist(g).tail)
        head = [i for i, op in enumerate(g.ops) if op.name not in tail]  # the server may run these
        _BUILT[name] = (m, a, k, g, head)
    return _BUILT[name]


def sweep(server, name: str, positions) -> None:
    """One offloading client per ``server_ops`` position; each: the example (cold: it uploads the server part's
    weights), fresh inputs and the example again (warm)."""
    m, a, k, g, _ = _model(name)
    for pos in positions:
        with CoinferClient(g, a, example_kwargs=k, name=name, server=server.address, policy="offload",
                           server_ops=pos, link=FAST, tenant=new_tenant(), profile_runs=2, fallback=False,
                           probe=False) as c:
            for j, (args, kwargs) in enumerate([(a, k), _fresh((a, k), 17 * pos + 1), (a, k)]):
                y = c(*args, **kwargs)
                rep = c.last_report
                assert not rep.fallback, (name, pos, j, rep.fallback_reason)
                pinned = set(c.engine.pinned.tail)  # einsum, matrix_exp and what follows them run on the UE
                assert rep.server_ops == len({op.name for op in c.graph.ops[pos:]} - pinned) > 0, (name, pos, j, rep)
                assert_as_eager(y, _eager(m, args, kwargs), c.reference(*args, **kwargs), (name, pos, j))
            assert (pos > 0 or c.reports[0].needed_upload_bytes > 0) and c.reports[-1].needed_upload_bytes == 0


@pytest.mark.parametrize("name", list(um.MODELS))
def test_a_mid_cut_cold_and_warm_equals_the_eager_model(server, name):
    head = _model(name)[-1]
    sweep(server, name, [head[len(head) // 2]])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(um.MODELS))
def test_every_third_cut_and_full_offload_equal_the_eager_model(server, name):
    head = _model(name)[-1]
    sweep(server, name, sorted({0, *(p for p in range(1, head[-1] + 1, 3))}))


def test_output_classes_as_the_user_wrote_them(server):
    """The dataclass keeps its fields (``attentions`` filled), the OrderedDict its key order and constant, the
    namedtuple its class and the 0-d mean beside it."""
    _, a, k, g, _ = _model("hf_dataclass")
    with CoinferClient(g, a, example_kwargs=k, server=server.address, policy="offload", link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        y = c(*a, **k)
    assert type(y) is um.EncoderOutput and y.attentions is not None and y.attentions.shape == (2, 6, 6)
    _, a, _, g, _ = _model("ordered_dict_out")
    y = CoinferClient(g, a)(*a)
    assert list(y) == ["zeta", "alpha", "n"] and y["n"] == 3
    _, a, _, g, _ = _model("namedtuple_out")
    pred, mean = CoinferClient(g, a)(*a)
    assert type(pred) is um.Pred and pred.labels.dtype == torch.int64 and pred.confident.dtype == torch.bool
    assert mean.ndim == 0


def test_padded_rewrite_equals_the_packed_model_the_capture_refuses(server):
    """``PackedGRU`` is refused naming the rewrite; ``PaddedGRU`` (the rewrite, same weights) split equals
    the packed module's own eager answer."""
    packed, (x, lengths), _ = um.packed_gru()
    padded, _, _ = um.padded_gru()
    with CoinferClient(padded, (x, lengths), server=server.address, policy="offload", server_ops=3, link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        for ln in (lengths, torch.tensor([2, 5, 4])):
            y = c(x, ln)
            want = _eager(packed, (x, ln), {})
            assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(y, want)), ln


@pytest.mark.parametrize("name", list(um.REFUSED))
def test_what_cannot_be_split_safely_is_refused_in_one_line(name):
    factory, pattern = um.REFUSED[name]
    m, a, k = factory()
    with pytest.raises(InputError, match=pattern) as info:
        CoinferClient(m, a, example_kwargs=k, name=name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["contiguous_model", "channels_last_model"])
def test_output_layout_follows_eager_for_each_input_layout(server, name):
    """A contiguous-captured conv net called with channels_last and HWC-permuted images answers channels_last as
    eager does (it answered the captured contiguous layout before, session 16's known limitation); a sliced
    input and a contiguous one too; each layout is captured once (the second call of a layout is a hit)."""
    m, a, _, _, _ = _model(name)
    x = a[0]
    cl = x.contiguous(memory_format=torch.channels_last)
    hwc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    sliced = torch.cat([x, x], dim=3)[..., ::2]
    with CoinferClient(m, a, server=server.address, policy="offload", server_ops=3, link=FAST, tenant=new_tenant(),
                       profile_runs=2, fallback=False, probe=False) as c:
        for xi in (cl, x.contiguous(), hwc, sliced, cl, x.contiguous()):
            y = c(xi)
            assert not c.last_report.fallback and c.last_report.server_ops > 0
            assert_as_eager(y, _eager(m, (xi,), {}), c.reference(xi), (name, xi.stride()))
        assert c._signatures.misses == 1, c._signatures.misses  # the example's layout and one other
    local = CoinferClient(m, a)
    y = local(cl)
    assert_as_eager(y, _eager(m, (cl,), {}), local.reference(cl), "local")


def test_last_report_after_a_failed_call_is_not_the_previous_one(server):
    m, a, _ = um.contiguous_model()
    with CoinferClient(m, a, server=server.address, policy="offload", server_ops=3, link=FAST, tenant=new_tenant(),
                       profile_runs=2, fallback=False, probe=False) as c:
        assert c.last_report is None
        c(*a)
        assert c.last_report is c.reports[-1] and c.last_report.request == 1
        with pytest.raises(InputError, match="float64"):
            c(a[0].double())
        assert c.last_report is None and len(c.reports) == 1
        with torch.no_grad():
            m.c1.weight.mul_(1.0)  # a weight changed in place: refused before anything runs
        with pytest.raises(InputError, match=r"c1\.weight"):
            c(*a)
        assert c.last_report is None
    c = CoinferClient(m, a)  # a new client after the change: its calls report again
    c(*a)
    assert c.last_report.request == 1


def test_calls_in_another_form_than_the_capture_are_captured_in_theirs(server):
    """Captured with ``attention_mask`` and ``output_attentions=True``: calls without the mask, with the other
    constant, and positionally, each answer as eager does, split, in their own graph (once per form; before
    session 17 each was refused). A client built on the graph alone refuses the first, naming the fix; a dtype
    the capture did not see is still refused, never cast."""
    m, a, k = um.hf_dataclass()
    ids, mask = a[0], k["attention_mask"]
    with CoinferClient(m, a, example_kwargs=k, server=server.address, policy="offload", link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        calls = [((ids,), {"output_attentions": True}), ((ids,), {"attention_mask": mask}), ((ids,), {}),
                 ((ids, mask, None, True), {}), ((ids,), {"output_attentions": True})]
        for args, kwargs in calls:
            y = c(*args, **kwargs)
            assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
            assert_as_eager(y, _eager(m, args, kwargs), c.reference(*args, **kwargs), (len(args), sorted(kwargs)))
        assert c._signatures.misses == 3, c._signatures.misses  # no mask; output_attentions=False; neither
        with pytest.raises(InputError, match="int32"):
            c(ids.int(), **k)
        with pytest.raises(InputError, match="unexpected keyword"):
            c(ids, bogus=1)
    g = CoinferClient(m, a, example_kwargs=k).graph
    bare = CoinferClient(g, a, example_kwargs=k)
    with pytest.raises(InputError, match=r"attention_mask.*NoneType.*capture one without it") as info:
        bare(ids, attention_mask=None, output_attentions=True)
    assert "\n" not in str(info.value) and bare.last_report is None
