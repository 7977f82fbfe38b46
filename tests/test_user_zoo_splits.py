"""Session 15's user models (``tests/user_zoo.py``: ``SESSION15``) over many partitions against a real edge
server (port 0): every cut position of the small graphs (a sample by default, all in the slow sweep) and random
non-suffix server-op sets, each cold (its weights uploaded by that request) and warm (fresh inputs, then the
example again), through a server that goes away (fallback), and called with what users change at call time
(another batch or sequence length, a keyword passed positionally, non-contiguous or ``requires_grad`` inputs,
grad mode). Every answer must have the eager module's structure, dtypes, shapes and strides, the captured
graph's values bit for bit (``c.reference``: the same ATen kernels on one thread here) and the eager module's
within ``ue_client.verify.TOLERANCES`` (float32 1e-4, half types 1e-2: eager may take PyTorch's fused fast
paths, e.g. ``nn.TransformerEncoder``'s ``_transformer_encoder_layer_fwd`` under ``no_grad``, measured <= 5e-7
off the traced math path here).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

from tests import user_zoo as uz
from tests.test_modelgraph_split import random_partitions
from ue_client import CoinferClient, InputError, new_tenant
from ue_client.verify import max_abs_diff, structure, within_tolerance

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
RUNS = [n for n in uz.SESSION15 + uz.SESSION16 if uz.KINDS[n] == "runs"]


def _eager(module: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, grad: bool = False):
    if grad:
        return module(*args, **(kwargs or {}))
    with torch.no_grad():
        return module(*args, **(kwargs or {}))


def _fresh(example: tuple, seed: int) -> tuple:
    """New values of the example's kinds; masks padded by length (a sequence padded whole makes eager's fused
    path answer NaN where the math path answers numbers: PyTorch's own inconsistency, not tested here)."""
    g = torch.Generator().manual_seed(seed)

    def one(t):
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return t
        if t.dtype == torch.bool or (t.dtype == torch.long and t.ndim == 2 and int(t.max()) <= 1 and int(t.min()) == 0):
            keep = torch.randint(1, t.shape[1] + 1, (t.shape[0],), generator=g)
            pad = torch.arange(t.shape[1])[None, :] >= keep[:, None]
            return pad if t.dtype == torch.bool else (~pad).long()
        if t.is_floating_point():
            return torch.randn(t.shape, generator=g).to(t.dtype)
        return torch.randint(int(t.min()), int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype)

    return tree_map(one, example)


def assert_as_eager(y, eager, ref, what) -> None:
    """``y`` has ``eager``'s structure and every tensor its dtype, shape and strides; its values are ``ref``'s
    bit for bit (NaN where ``ref`` has NaN) and ``eager``'s within TOLERANCES."""
    assert structure(y) == structure(eager), (what, structure(y), structure(eager))
    assert type(y) is type(eager), (what, type(y), type(eager))
    for a, b in zip(tree_leaves(y), tree_leaves(eager), strict=True):
        if isinstance(b, torch.Tensor):
            assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()), (
                what, a.dtype, a.shape, a.stride(), b.dtype, b.shape, b.stride())
    assert max_abs_diff(y, ref) == 0.0, (what, max_abs_diff(y, ref))
    assert within_tolerance(y, eager), (what, max_abs_diff(y, eager))


def _partitions(graph, *, every: bool, n_random: int) -> list[frozenset[str]]:
    names = [op.name for op in graph.ops]
    n = len(names)
    step = 1 if every or n <= 12 else max(1, n // 8)
    cuts = sorted({*range(0, n + 1, step), n})
    parts = [frozenset(names[k:]) for k in cuts]
    if n >= 3:  # random_partitions samples up to 3 ops
        parts += random_partitions(graph, seed=15, n_random=n_random, n_antichain=n_random)
    return list(dict.fromkeys(parts))


_GRAPHS: dict[str, tuple] = {}


def _model(name: str):
    """(module, example, captured graph) of a zoo model, captured once per test process."""
    if name not in _GRAPHS:
        module, example = getattr(uz, name)()
        _GRAPHS[name] = (module, example, CoinferClient(module, example, name=name).graph)
    return _GRAPHS[name]


def sweep(server, name: str, *, every: bool, n_random: int) -> int:
    """Every partition of ``_partitions`` through its own offloading client (a fixed split), cold then warm;
    returns how many partitions ran."""
    module, example, graph = _model(name)
    parts = _partitions(graph, every=every, n_random=n_random)
    for i, part in enumerate(parts):
        with CoinferClient(graph, example, name=name, server=server.address, policy="offload", server_ops=part,
                           link=FAST, tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
            pinned = set(c.engine.pinned.tail) if hasattr(c.engine, "pinned") else set()
            for j, x in enumerate((example, _fresh(example, 100 * i + 1), example)):
                y = c(*x)
                rep = c.last_report
                assert not rep.fallback, (name, i, j, rep.fallback_reason)
                assert rep.server_ops == len(part - pinned), (name, i, j, rep.server_ops, len(part))
                assert_as_eager(y, _eager(module, x), c.reference(*x), (name, i, j, len(part)))
    return len(parts)


@pytest.mark.parametrize("name", RUNS)
def test_partitions_cold_and_warm_equal_the_eager_model(server, name):
    assert sweep(server, name, every=False, n_random=2) >= min(5, len(_model(name)[2].ops) + 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, kind in uz.KINDS.items() if kind == "runs"])
def test_every_cut_and_random_partitions_sweep(server, name):
    """Every model of the user zoo (the earlier sessions' too), every cut position and 16 random partitions."""
    assert sweep(server, name, every=True, n_random=8) >= len(_model(name)[2].ops) + 1


@pytest.mark.parametrize("name", ["gpt_masked", "strided_out", "mixed_head", "bf16_mlp"])
def test_fallback_when_the_server_goes_away_equals_the_eager_model(name):
    """A warm split, then the server stopped: the next requests fall back to the captured graph here and
    answer as before; a client whose server never answered does too."""
    from edge_server.testing import ServerThread

    module, example, graph = _model(name)
    mid = frozenset(op.name for op in graph.ops[len(graph.ops) // 2:])
    srv = ServerThread(threads=1).start()
    try:
        c = CoinferClient(graph, example, name=name, server=srv.address, policy="offload", server_ops=mid, link=FAST,
                          tenant=new_tenant(), profile_runs=2, probe=False, timeout_ms=20_000)
        y = c(*example)
        assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
        assert_as_eager(y, _eager(module, example), c.reference(*example), (name, "split"))
    finally:
        srv.stop()
    try:
        for k in range(2):
            x = _fresh(example, 7 + k)
            y = c(*x)
            assert c.last_report.fallback, c.last_report
            assert_as_eager(y, _eager(module, x), c.reference(*x), (name, "fallback", k))
    finally:
        c.close()
    with CoinferClient(graph, example, name=name, server=srv.address, policy="offload", link=FAST,
                       tenant=new_tenant(), profile_runs=2, probe=False, connect_timeout_s=2.0) as gone:
        x = _fresh(example, 9)
        y = gone(*x)
        assert gone.last_report.server_ops == 0
        assert_as_eager(y, _eager(module, x), gone.reference(*x), (name, "unreachable"))


def test_call_time_differences_from_the_example(server):
    """What users change at call time, each through a split: another batch and sequence length (captured once
    more), ``attention_mask`` as a keyword or positionally, non-contiguous token ids, ``requires_grad`` inputs
    and a call with grad enabled, a dtype the capture did not see (refused, never cast)."""
    module, example, _ = _model("gpt_masked")
    ids, mask = example
    with CoinferClient(module, example, name="gpt_masked", server=server.address, policy="offload", link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        for args, kwargs in [((ids,), {"attention_mask": mask}), ((ids, mask), {}),
                             (_fresh((uz.tokens(batch=3, length=5), torch.ones(3, 5, dtype=torch.long)), 3), {}),
                             ((uz.tokens(batch=5, length=2).t(), torch.ones(2, 5, dtype=torch.long)), {})]:
            y = c(*args, **kwargs)
            assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
            assert_as_eager(y, _eager(module, args, kwargs), c.reference(*args, **kwargs), args[0].shape)
        with pytest.raises(InputError, match="int64"):
            c(ids.int(), mask)
    tb, tex, _ = _model("timm_block")
    with CoinferClient(tb, tex, name="timm_block", server=server.address, policy="offload", link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        x = _fresh(tex, 4)[0].requires_grad_(True)
        y = c(x)  # the user's tensor is read, not changed, and nothing is recorded for autograd on it
        assert not c.last_report.fallback and x.grad is None
        assert_as_eager(y, _eager(tb, (x,)), c.reference(x.detach()), "requires_grad")
        assert within_tolerance(y, tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                            _eager(tb, (x,), grad=True)))
    enc, eex, _ = _model("tf_encoder")
    with CoinferClient(enc, eex, name="tf_encoder", server=server.address, policy="offload", link=FAST,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        y = c(*eex)  # the fused fast path (no grad) and the math path (grad) both within tolerance
        assert within_tolerance(y, _eager(enc, eex)) and within_tolerance(y, _eager(enc, eex, grad=True).detach())


def test_padded_transformer_encoder_refused_even_when_the_example_pads_nothing():
    """Captured with an all-False ``src_key_padding_mask`` the check against eager passed, and a request whose
    mask padded answered 1.8 off ``model(x, mask)`` under ``no_grad`` (0 at the padded positions there). Now the
    capture refuses it naming the fix; with ``enable_nested_tensor=False`` or without a mask it runs."""
    module, (ids, none_padded) = uz.tf_encoder_padded()
    with pytest.raises(InputError, match=r"_Encoder\.enc \(TransformerEncoder\).*enable_nested_tensor=False"):
        CoinferClient(module, (ids, none_padded))
    c = CoinferClient(module, (ids,))  # no mask: no nested tensors, runs
    assert within_tolerance(c(ids), _eager(module, (ids,)))
    flat, (fids, pad) = uz.tf_encoder_padded_flat()
    c = CoinferClient(flat, (fids, pad))
    assert within_tolerance(c(fids, pad), _eager(flat, (fids, pad)))
    assert not list(module.enc._forward_pre_hooks.values()), "the capture's hooks stay on the user's module"


def test_random_draws_in_forward_are_refused_and_eval_dropout_is_not():
    """``x + 1e-6 * randn_like(x)`` passed the comparison with eager before and every path answered other bits
    on every call; now refused naming the op. Dropout, DropPath and SDPA without dropout in eval are kept."""
    module, example = uz.random_in_forward()
    with pytest.raises(InputError, match=r"Noisy draws random numbers \(aten\.randn_like\.default\)"):
        CoinferClient(module, example)

    class McDropout(torch.nn.Module):  # dropout forced on at inference (MC dropout)
        def forward(self, x):
            return torch.nn.functional.dropout(x, 0.5, training=True)

    with pytest.raises(InputError, match="draws random numbers"):
        CoinferClient(McDropout(), (torch.randn(2, 4),))
    tb, tex, _ = _model("timm_block")
    assert within_tolerance(CoinferClient(tb, tex)(*tex), _eager(tb, tex))


def test_factory_ops_keep_their_captured_dtype_when_the_default_dtype_changes(server):
    """``torch.full(size, -inf)`` in forward (``MhaMasks``'s causal mask) was captured without a dtype: after
    ``torch.set_default_dtype(torch.float64)`` in the UE process its local part made float64 and the split
    failed ("Input dtypes must be the same"). The capture now pins the traced dtype: local and split runs
    answer the captured float32, bit for bit."""
    module, example, graph = _model("mha_masks")
    (full,) = [op for op in graph.ops if op.target == "aten.full.default"]
    assert full.kwargs["dtype"] == {"dtype": "float32"}
    want = _eager(module, example)
    with CoinferClient(graph, example, name="mha_masks", server=server.address, policy="offload", link=FAST,
                       server_ops=len(graph.ops) // 2, tenant=new_tenant(), profile_runs=2, fallback=False,
                       probe=False) as c:
        c(*example)
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            y = c(*example)
            ref = c.reference(*example)
        finally:
            torch.set_default_dtype(before)
        assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
        assert_as_eager(y, want, ref, "default float64")
