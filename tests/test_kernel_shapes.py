"""Shape rules the CPU kernels assume and do not check, checked while a client's slice is validated
(``modelgraph.kernel_shapes``).

Session 28: a batch norm's 1-element running mean for 4 channels answered values read from outside it; an LSTM
whose weights were smaller than its hidden size faulted the server's meta kernel while it validated the slice
(SIGSEGV: every tenant's session gone) and answered from outside them on CPU; ``_weight_norm`` read ``g`` past its
end. Every rule must pass what PyTorch's own modules produce and refuse each changed shape.
"""

from __future__ import annotations

import itertools
import json

import grpc
import pytest
import torch
from torch import nn

from modelgraph.allowlist import resolve
from modelgraph.errors import ShapeError
from modelgraph.kernel_shapes import SHAPE_CHECKED, checked_shapes

RNNS = {"aten.lstm.input": nn.LSTM, "aten.gru.input": nn.GRU, "aten.rnn_tanh.input": nn.RNN,
        "aten.rnn_relu.input": nn.RNN}


def _rnn_cases():
    batched = True  # (an unbatched module call reaches the op batched: nn.RNN adds the batch dim)
    for target, layers, bidir, bias, batch_first, proj in itertools.product(
            RNNS, (1, 2), (False, True), (False, True), (False, True), (0, 2)):
        if proj and target != "aten.lstm.input":
            continue
        kw = {"num_layers": layers, "bidirectional": bidir, "bias": bias, "batch_first": batch_first}
        if target == "aten.rnn_relu.input":
            kw["nonlinearity"] = "relu"
        if proj:
            kw["proj_size"] = proj
        torch.manual_seed(layers)
        m = RNNS[target](3, 4, **kw).eval()
        x = torch.randn((2, 5, 3) if batch_first else (5, 2, 3)) if batched else torch.randn(5, 3)
        lead = (layers * (2 if bidir else 1),) + ((2,) if batched else ())
        out = proj or 4
        hx = [torch.randn(*lead, out), torch.randn(*lead, 4)] if target == "aten.lstm.input" else torch.randn(*lead, 4)
        yield target, (x, hx, list(m._flat_weights), bias, layers, 0.0, False, bidir, batch_first)


def _shrunk(t: torch.Tensor) -> torch.Tensor:
    return t[:-1] if t.shape[0] > 1 else torch.zeros(2, *t.shape[1:])


def test_rnn_rule_passes_every_module_layout_and_refuses_each_changed_parameter() -> None:
    cases = 0
    for target, args in _rnn_cases():
        fn, ok = resolve(target), checked_shapes(target, resolve(target), "rnn")
        with torch.inference_mode():
            want = fn(*args)
            got = ok(*args)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), target
        x, hx, params, *rest = args
        for i in range(len(params)):
            bad = [*params[:i], _shrunk(params[i]), *params[i + 1:]]
            with pytest.raises(ShapeError, match=rf"params\[{i}\]"):
                ok(x, hx, bad, *rest)
        with pytest.raises(ShapeError, match="parameters"):
            ok(x, hx, params[:-1], *rest)
        h = hx[0] if isinstance(hx, list) else hx
        bad_h = torch.zeros(*h.shape[:-1], h.shape[-1] + 1)
        with pytest.raises(ShapeError):
            ok(x, [bad_h, hx[1]] if isinstance(hx, list) else bad_h, params, *rest)
        cases += 1
    assert cases == 4 * 16 + 16  # every layout of the four RNN ops, LSTM's projections too


@pytest.mark.parametrize("target", ["aten._native_batch_norm_legit_no_training.default",
                                    "aten.native_batch_norm.default", "aten.batch_norm.default"])
def test_batch_norm_parameters_have_one_value_per_channel(target: str) -> None:
    x = torch.randn(2, 4, 3, 3)
    params = {"weight": torch.rand(4) + 0.5, "bias": torch.randn(4), "running_mean": torch.randn(4),
              "running_var": torch.rand(4) + 0.5}

    def call(p):
        w, b, m, v = p["weight"], p["bias"], p["running_mean"], p["running_var"]
        if target.startswith("aten._native"):
            return (x, w, b, m, v, 0.1, 1e-5)
        if target == "aten.native_batch_norm.default":
            return (x, w, b, m, v, False, 0.1, 1e-5)
        return (x, w, b, m, v, False, 0.1, 1e-5, False)

    fn, ok = resolve(target), checked_shapes(target, resolve(target), "bn")
    want, got = fn(*call(params)), ok(*call(params))
    assert torch.equal(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want)
    for name in params:
        with pytest.raises(ShapeError, match=f"{name} has 1 elements"):
            ok(*call({**params, name: params[name][:1]}))
    if target != "aten._native_batch_norm_legit_no_training.default":  # optional there: None passes
        ok(*call({**params, "weight": None, "bias": None}))


def test_weight_norm_g_matches_the_fused_kernels_dim() -> None:
    target = "aten._weight_norm.default"
    fn, ok = resolve(target), checked_shapes(target, resolve(target), "wn")
    v = torch.randn(4, 3, 2)
    for dim in (0, 2):
        g = torch.rand([v.shape[d] if d == dim else 1 for d in range(3)])
        assert torch.equal(ok(v, g, dim), fn(v, g, dim))
        with pytest.raises(ShapeError, match="g has 1 elements"):
            ok(v, torch.rand(1, 1, 1), dim)
    g1 = torch.rand(1, 3, 1)  # dim 1: not the fused kernel's case (the composite broadcasts): left alone
    assert torch.equal(ok(v, g1, 1), fn(v, g1, 1))


def test_the_rules_are_on_the_allowlist() -> None:
    from modelgraph.allowlist import ALLOWED_OPS

    assert SHAPE_CHECKED <= ALLOWED_OPS


def test_models_users_write_still_validate_and_run_split_and_whole() -> None:
    """An LSTM tagger with a weight-normed head and a conv net with batch and weight norms: at every suffix cut the
    server part validates (the rules included) and the split run equals the user's module, bit for bit."""
    from modelgraph import capture
    from tests.test_modelgraph_split import assert_bitwise, build_program, run_split

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(30, 6)
            self.rnn = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
            self.gru = nn.GRU(10, 4)
            self.out = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))

        def forward(self, ids):
            h, _ = self.rnn(self.emb(ids))
            h, _ = self.gru(h)
            return self.out(h)

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.utils.weight_norm(nn.Conv2d(4, 2, 1)))
    for module, x in ((Tagger(), torch.randint(0, 30, (2, 7))), (conv, torch.randn(1, 3, 8, 8))):
        module.eval()
        with torch.inference_mode():
            want = (module(x),)
        g = capture(module, (x,))
        assert {op.target for op in g.ops} & SHAPE_CHECKED
        names = [op.name for op in g.ops]
        for k in range(len(names) + 1):
            sp, prog, weights = build_program(g, frozenset(names[k:]))
            assert_bitwise(run_split(g, sp, prog, weights, (x,)), want)


# ---- from outside: a stranger's ProfileGraph against a real server process ------------------------------------
def _lstm_spec(rows_ih: int, rows_hh: int) -> bytes:
    from tests.slice_json import meta, zeros

    ops = [zeros("h0", [1, 1, 4]), zeros("c0", [1, 1, 4]), zeros("wih", [rows_ih, 3]), zeros("whh", [rows_hh, 4]),
           {"name": "rnn", "target": "aten.lstm.input", "multi": True, "kwargs": {},
            "args": [{"t": "x"}, [{"t": "h0"}, {"t": "c0"}], [{"t": "wih"}, {"t": "whh"}], False, 1, 0.0, False,
                     False, False],
            "outputs": [meta([2, 1, 4]), meta([1, 1, 4]), meta([1, 1, 4])]}]
    return json.dumps({"version": 1, "ops": ops, "inputs": {"x": meta([2, 1, 3])}, "outputs": ["rnn#0"],
                       "weights": {}}).encode()


def _bn_spec(stats: int) -> bytes:
    from tests.slice_json import meta, zeros

    ops = [zeros("w", [4]), zeros("b", [4]), zeros("m", [stats]), zeros("v", [stats]),
           {"name": "bn", "target": "aten._native_batch_norm_legit_no_training.default", "multi": True, "kwargs": {},
            "args": [{"t": "x"}, {"t": "w"}, {"t": "b"}, {"t": "m"}, {"t": "v"}, 0.1, 1e-5],
            "outputs": [meta([2, 4, 3, 3]), meta([stats]), meta([stats])]}]
    return json.dumps({"version": 1, "ops": ops, "inputs": {"x": meta([2, 4, 3, 3])}, "outputs": ["bn#0"],
                       "weights": {}}).encode()


def test_a_strangers_rnn_and_batch_norm_are_refused_at_validation() -> None:
    """Before the rules the LSTM's validation killed ``coinfer-edge serve`` (SIGSEGV in the meta kernel) and the
    batch norm ran, reading outside its statistics. Now both are INVALID_ARGUMENT naming the argument, the valid
    ones still run, and the server goes on."""
    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
    from tests.test_server_cli import running_server

    with running_server("--threads", "1") as (proc, address):
        ch = grpc.insecure_channel(address)
        stub = pbg.EdgeServiceStub(ch)

        def profile(spec: bytes):
            return stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1, warmup=0), timeout=60)

        for spec, words in ((_lstm_spec(2, 2), "params[0] (layer 0) is [2, 3]; expected [16, 3]"),
                            (_bn_spec(1), "running_mean has 1 elements [1]; an input of 4 channels needs 4")):
            with pytest.raises(grpc.RpcError) as e:
                profile(spec)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert words in e.value.details()
            assert proc.poll() is None
        assert profile(_lstm_spec(16, 16)).ops and profile(_bn_spec(4)).ops
        assert stub.Hello(pb.HelloRequest(client_version="t"), timeout=20).server_version
        ch.close()
