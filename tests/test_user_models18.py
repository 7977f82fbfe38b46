"""Session 18's user models (``tests/user_models18.py``) through a real edge server (port 0, one per module):
full offload and a mid cut each (every third cut in the slow sweep), cold (the request uploads its weights) and
warm (fresh values, the example again, then another batch size), every answer compared with the user's own eager
``module(*args, **kwargs)``: output classes, structure, dtypes, shapes, strides, values bit for bit against the
captured graph (``c.reference``) and within ``TOLERANCES`` of eager.

Also: a forward that reads the autograd mode (``torch.is_grad_enabled()``, ``torch.is_inference_mode_enabled()``,
``x.requires_grad``) answers as eager in each mode (before: the captured mode's answer, 0.96 off ``model(x)``, or
a refusal "differs from the eager module" when captured with grad on), and a lazy module never run and a
dynamically quantized model are refused in one line naming the fix (before: torch's ValueError, and torch.export's
"LinearPackedParamsBase ... '__obj_flatten__'").
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._pytree import tree_map

from modelgraph.pinning import pin_off_allowlist
from tests import user_models18 as um
from tests.test_user_zoo_splits import FAST, assert_as_eager
from ue_client import CoinferClient, InputError, new_tenant


def _eager(module, args, kwargs):
    with torch.no_grad():
        return module(*args, **kwargs)


def _fresh(tree, seed: int):
    """New values for the floating and complex tensors of ``tree`` (integer and bool inputs kept), in each
    tensor's own layout."""
    g = torch.Generator().manual_seed(seed)
    return tree_map(lambda t: torch.empty_like(t).copy_(torch.randn(t.shape, generator=g).to(t.dtype))
                    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) else t, tree)


def _bigger(tree):
    """Another batch size: each tensor with a leading dimension doubled (its rows and the same rows flipped);
    0-d and empty tensors as they are."""
    return tree_map(lambda t: torch.cat([t, t.flip(0)]) if isinstance(t, torch.Tensor) and t.ndim and t.shape[0]
                    else t, tree)


_BUILT: dict[str, tuple] = {}


def _model(name: str):
    """(module, args, kwargs, captured graph, head) of a model, captured once per test process; ``head``: the
    positions of the ops the server may run (not pinned to the UE, ``modelgraph.pinning``)."""
    if name not in _BUILT:
        m, a, k = um.MODELS[name]()
        g = CoinferClient(m, a, example_kwargs=k, name=name).graph
        tail = set(pin_off_allowlist(g).tail)
        head = [i for i, op in enumerate(g.ops) if op.name not in tail]
        _BUILT[name] = (m, a, k, g, head)
    return _BUILT[name]


def sweep(server, name: str, positions, *, bigger: bool = True, on_graph=()) -> None:
    """One offloading client per ``server_ops`` position, built on the module (so another batch size is captured
    again); each: the example (cold), fresh values and the example again (warm), then another batch size. A position
    in ``on_graph``: its client is built on the graph ``_model`` captured (the same ``capture`` of the same module and
    inputs: not captured again, ~1 s a model) and is not called with another batch size."""
    m, a, k, g, _ = _model(name)
    for pos in positions:
        with CoinferClient(g if pos in on_graph else m, a, example_kwargs=k, name=name, server=server.address,
                           policy="offload", server_ops=pos, link=FAST, tenant=new_tenant(), profile_runs=2,
                           fallback=False, probe=False) as c:
            more = bigger and pos not in on_graph
            calls = [(a, k), _fresh((a, k), 17 * pos + 1), (a, k)] + ([_bigger((a, k))] if more else [])
            for j, (args, kwargs) in enumerate(calls):
                y = c(*args, **kwargs)
                rep = c.last_report
                assert not rep.fallback, (name, pos, j, rep.fallback_reason)
                assert rep.server_ops > 0 or j == 3, (name, pos, j, rep)
                assert_as_eager(y, _eager(m, args, kwargs), c.reference(*args, **kwargs), (name, pos, j))
            assert c.reports[2].needed_upload_bytes == 0  # warm: the server holds what it needs


@pytest.mark.parametrize("name", list(um.MODELS))
def test_full_offload_and_a_mid_cut_cold_warm_and_another_batch_equal_the_eager_model(server, name):
    head = _model(name)[-1]
    if name == "deep_sequential":  # 1200 ops: one cut here, on the captured graph (~10 s), more in the slow sweep
        sweep(server, name, [head[len(head) // 2]], bigger=False, on_graph={head[len(head) // 2]})
    else:  # full offload on the captured graph; the mid cut on the module, then with another batch size too
        mid = head[len(head) // 2]
        sweep(server, name, sorted({0, mid}), on_graph={0} if mid else set())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(um.MODELS))
def test_every_third_cut_or_twelve_equal_the_eager_model(server, name):
    head = _model(name)[-1]
    sweep(server, name, sorted(set(head[::max(3, len(head) // 12)]) - {0}), bigger=False)  # deep: 12 cuts


def test_output_structures_as_the_user_wrote_them():
    """A dict of lists with the anchors buffer as is; int keys, None, a string and an int from the shape."""
    m, a, _, g, _ = _model("det_dict_of_lists")
    y = CoinferClient(g, a)(*a)
    assert list(y) == ["cls", "box", "anchors"] and [t.shape for t in y["box"]] == [(2, 4, 64), (2, 4, 16)]
    assert torch.equal(y["anchors"], m.anchors) and y["anchors"].stride() == m.anchors.stride() == (1, 3)
    m, a, _, _, _ = _model("int_keys_out")
    c = CoinferClient(m, a)
    out, none, tag, n = c(torch.randn(5, 4))
    assert list(out) == [0, 1, 2] and none is None and tag == "v1" and n == 5


@pytest.mark.parametrize("reads", ["grad", "inference", "requires_grad"])
def test_a_forward_that_reads_the_autograd_mode_answers_as_eager_in_each_mode(server, reads):
    """Built with grad on, then called under ``no_grad``, ``inference_mode``, with grad and with an input that
    requires grad, split: each answer is eager's in that mode (before: the captured mode's, 0.96 off, and a
    ``no_grad`` capture of ``is_grad_enabled`` refused nothing; with grad on the capture was refused)."""
    m, (x,), _ = um.grad_aware(reads)
    xr = x.clone().requires_grad_()
    with CoinferClient(m, (x,), server=server.address, policy="offload", server_ops=1, link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        assert c.graph.grad_mode is not None
        for mode, xi in [(torch.no_grad, x), (torch.inference_mode, x), (torch.enable_grad, x),
                         (torch.enable_grad, xr), (torch.no_grad, x)]:
            with mode():
                y = c(xi)
                want = m(xi)
            assert not c.last_report.fallback and c.last_report.server_ops == 1
            assert torch.equal(y, want.detach()), (reads, mode.__name__, xi.requires_grad)
    with torch.no_grad():  # built without grad: called with grad, eager's answer (before: the no-grad one)
        c = CoinferClient(m, (x,))
    assert torch.equal(c(xr), m(xr).detach())


def test_a_forward_that_does_not_read_the_mode_is_captured_once():
    m, a, _, _, _ = _model("bert_token_types")
    c = CoinferClient(m, a)
    assert c.graph.grad_mode is None
    with torch.no_grad():
        c(*a)
    with torch.inference_mode():
        c(*a)
    assert c._signatures.misses == 0


@pytest.mark.parametrize("name", list(um.REFUSED))
def test_what_cannot_be_captured_is_refused_in_one_line(name):
    factory, pattern = um.REFUSED[name]
    m, a, k = factory()
    with pytest.raises(InputError, match=pattern) as info:
        CoinferClient(m, a, example_kwargs=k, name=name)
    assert "\n" not in str(info.value)


class _ComplexOps(torch.nn.Module):
    def forward(self, z):
        return (z * 2).real + 1, z.imag * 3, z.abs()


def test_a_lazily_conjugated_input_answers_as_eager(server):
    """``client(z.conj())`` (a conjugate-bit view: its bytes are ``z``'s) split and local: eager's answer (before:
    "torch.Tensor.view is not supported for conjugate view tensors" from the split's send)."""
    m = _ComplexOps()
    z = torch.randn(3, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(5))
    with CoinferClient(m, (z,), server=server.address, policy="offload", server_ops=0, link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        for zi in (z.conj(), z, z.conj()):
            y = c(zi)
            assert c.last_report.server_ops > 0
            assert_as_eager(y, _eager(m, (zi,), {}), c.reference(zi), zi.is_conj())


def test_a_factory_returning_module_args_and_kwargs_runs_in_the_cli(server, cli, tmp_path):
    """``--model pkg.mod:factory`` whose factory returns ``(module, args, kwargs)`` (a forward with keyword
    inputs: ``attention_mask=``, ``output_attentions=True``): ``profile``, ``plan`` and ``run --verify`` capture
    and call it with those keywords, split equal to eager (before: "returned tuple, not an nn.Module")."""
    from modelgraph import load_model

    lm = load_model("tests.user_models17:hf_dataclass")
    assert set(lm.example_kwargs) == {"attention_mask", "output_attentions"}
    spec = ["--model", "tests.user_models17:hf_dataclass"]
    rc, out, err = cli("profile", *spec, "--runs", "2", "--threads", "1")
    assert rc == 0, err
    rc, out, err = cli("plan", *spec, "--server", server.address, "--uplink-mbps", "20", "--rtt-ms", "40",
                       "--policy", "mjoa", "--runs", "2")
    assert rc == 0 and "mjoa" in out, err
    rc, out, err = cli("run", *spec, "--server", server.address, "--requests", "2", "--policy", "offload",
                       "--verify", "--json", str(tmp_path / "run.json"))
    assert rc == 0, err
    reqs = json.loads((tmp_path / "run.json").read_text())["requests"]
    assert len(reqs) == 2 and all(r["server_ops"] > 0 and not r["fallback"] and r["max_abs_diff_vs_local"] == 0
                                  and r["max_abs_diff_vs_eager"] <= 1e-5 for r in reqs), reqs


def test_a_forward_that_reads_the_default_dtype_is_refused_under_another():
    """``x.to(torch.get_default_dtype())`` in forward: after ``torch.set_default_dtype(torch.float64)`` eager answers
    float64; the client refuses naming the default (before: float32 on every path, silently)."""
    m, a, _ = um.default_dtype_out()
    c = CoinferClient(m, a)
    assert c(*a).dtype == torch.float32
    torch.set_default_dtype(torch.float64)
    try:
        assert _eager(m, a, {}).dtype == torch.float64
        with pytest.raises(InputError, match=r"default dtype is torch\.float64, torch\.float32 when the client"):
            c(*a)
    finally:
        torch.set_default_dtype(torch.float32)
    assert c(*a).dtype == torch.float32


@pytest.mark.parametrize("how", ["register_buffer", "setattr"])
def test_a_returned_buffer_replaced_after_capture_is_refused(how):
    """The detection head returns its anchors buffer as is (no op reads it): replaced after capture, every path
    still returned the old one (before: silently the captured anchors); now refused naming it."""
    m, a, _ = um.det_dict_of_lists()
    c = CoinferClient(m, a)
    if how == "register_buffer":
        m.register_buffer("anchors", torch.zeros(3, 4))
    else:
        m.anchors = torch.ones(3, 4)
    with pytest.raises(InputError, match=r"'anchors' was replaced after the client captured it"):
        c(*a)
