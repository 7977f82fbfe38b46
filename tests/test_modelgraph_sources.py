"""Model sources and bad input: every user mistake gives a ModelSourceError/CaptureError that says what
to do; a local weights file round-trips; the model hash follows the architecture, not the weights."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from modelgraph import CaptureError, ModelSourceError, capture, load_model, run_graph
from modelgraph.zoo import chain

FACTORIES = '''
import torch
from torch import nn

EVIL_RAN = []


def raises():
    raise ValueError("boom: factory is broken")


def not_a_module():
    return 42


def bare_module():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


def pair_with_single_tensor():
    return nn.Linear(4, 2), torch.ones(1, 4)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def data_dependent():
    return DataDependent(), (torch.ones(1, 4),)


class Evil:
    def __reduce__(self):
        return (EVIL_RAN.append, ("code ran while loading weights",))
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    d = tmp_path_factory.mktemp("factories")
    name = f"coinfer_test_factories_{uuid.uuid4().hex[:8]}"
    (d / f"{name}.py").write_text(textwrap.dedent(FACTORIES))
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(d))
    yield name
    mp.undo()


# ---- specs ----------------------------------------------------------------------------------------
def test_unknown_torchvision_name_has_a_hint():
    with pytest.raises(ModelSourceError, match=r"unknown torchvision model 'resnet19'\. Did you mean: .*resnet18"):
        load_model("torchvision:resnet19")
    with pytest.raises(ModelSourceError, match=r"model 'zzzz'\. See torchvision.models.list_models"):
        load_model("torchvision:zzzz")


@pytest.mark.parametrize("spec", ["resnet18", "", 42, None])
def test_spec_without_kind(spec):
    with pytest.raises(ModelSourceError, match=r"must be 'torchvision:NAME' or 'package.module:factory'"):
        load_model(spec)


@pytest.mark.parametrize("spec", ["./mymodels.py:net", "mymodels.py:net", "models/mymodels.py:net"])
def test_spec_with_a_file_path_names_the_module_form(spec):
    """A path instead of a module name (newuser32: a TypeError about relative imports) names the spec to give."""
    with pytest.raises(ModelSourceError, match=r"names a file: give its module name, mymodels:net, from the folder"):
        load_model(spec)


def test_factory_errors(factories):
    with pytest.raises(ModelSourceError, match=rf"factory {factories}:raises raised ValueError: boom"):
        load_model(f"{factories}:raises")
    with pytest.raises(ModelSourceError, match=r"returned int, not an nn.Module"):
        load_model(f"{factories}:not_a_module")
    with pytest.raises(ModelSourceError, match=rf"'{factories}' has no callable 'missing'"):
        load_model(f"{factories}:missing")
    with pytest.raises(ModelSourceError, match=rf"'{factories}' has no callable 'EVIL_RAN'"):
        load_model(f"{factories}:EVIL_RAN")  # exists, but a list is not a factory
    with pytest.raises(ModelSourceError, match=r"cannot import 'no_such_pkg_coinfer\.models'.*PYTHONPATH"):
        load_model("no_such_pkg_coinfer.models:make")
    with pytest.raises(ModelSourceError, match=r"'modelgraph.zoo' has no callable 'no_such_model'"):
        load_model("modelgraph.zoo:no_such_model")


def test_factory_return_forms(factories):
    lm = load_model(f"{factories}:bare_module")  # no inputs: the default image shape
    assert [tuple(x.shape) for x in lm.example_inputs] == [(1, 3, 224, 224)]
    lm = load_model(f"{factories}:bare_module", input_shape=(2, 3, 16, 16))
    assert [tuple(x.shape) for x in lm.example_inputs] == [(2, 3, 16, 16)]
    lm = load_model(f"{factories}:pair_with_single_tensor")  # a bare tensor is wrapped into a tuple
    assert len(lm.example_inputs) == 1 and torch.equal(lm.example_inputs[0], torch.ones(1, 4))
    assert not lm.module.training


def test_data_dependent_control_flow_is_a_capture_error(factories):
    lm = load_model(f"{factories}:data_dependent")
    with pytest.raises(CaptureError, match=r"DataDependent branches on a tensor's value.*torch.where"):
        capture(lm.module, lm.example_inputs)


def test_non_tensor_example_input_is_a_capture_error():
    module, _ = chain()
    with pytest.raises(CaptureError, match=r"could not capture Chain: .+"):
        capture(module, ([1.0, 2.0],))  # a constant the forward cannot use: torch.export's own reason


# ---- weights files --------------------------------------------------------------------------------
@pytest.fixture
def perturbed_chain(tmp_path):
    module, inputs = chain()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
    path = tmp_path / "chain.pt"
    torch.save(module.state_dict(), path)
    return module, inputs, path


def test_weights_file_round_trip(perturbed_chain):
    module, inputs, path = perturbed_chain
    lm = load_model("modelgraph.zoo:chain", weights=path)
    for (k, a), (k2, b) in zip(lm.module.state_dict().items(), module.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        want = module(*inputs)
        assert not torch.equal(want, chain()[0](*inputs)), "the file must change the model"
        torch.testing.assert_close(lm.module(*lm.example_inputs), want, rtol=0, atol=0)
    g = capture(lm.module, lm.example_inputs)
    torch.testing.assert_close(run_graph(g, inputs), want, rtol=0, atol=0)
    # same architecture, other weights: same structural hash, other content addresses
    fresh = capture(*chain())
    assert g.model_hash == fresh.model_hash
    assert g.weight_sha256("fc.weight") != fresh.weight_sha256("fc.weight")


def test_wrapped_state_dict_is_accepted(perturbed_chain, tmp_path):
    module, _, _ = perturbed_chain
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": module.state_dict(), "epoch": 3}, path)
    lm = load_model("modelgraph.zoo:chain", weights=path)
    assert torch.equal(lm.module.fc.weight, module.fc.weight)


def test_bad_weights_files(tmp_path):
    with pytest.raises(ModelSourceError, match=r"weights file '.*nope.pt' does not exist"):
        load_model("modelgraph.zoo:chain", weights=tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelSourceError, match=r"cannot read weights file '.*corrupt.pt'.*torch.save\(model"):
        load_model("modelgraph.zoo:chain", weights=corrupt)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"cannot read weights file"):
        load_model("modelgraph.zoo:chain", weights=empty)
    with pytest.raises(ModelSourceError, match=r"cannot read weights file"):
        load_model("modelgraph.zoo:chain", weights=tmp_path)  # a directory
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor)
    with pytest.raises(ModelSourceError, match=r"holds a Tensor, not a state dict"):
        load_model("modelgraph.zoo:chain", weights=tensor)
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), other)
    with pytest.raises(ModelSourceError, match=r"does not fit Chain: 6 missing: conv1.weight, .*; 2 unexpected: "):
        load_model("modelgraph.zoo:chain", weights=other)


def test_state_dict_errors_list_missing_unexpected_and_misshaped_keys(perturbed_chain, tmp_path):
    module, _, _ = perturbed_chain
    sd = module.state_dict()
    sd.pop("conv2.bias")
    sd["fc.weight"] = torch.zeros(3, 3)
    sd["extra.thing"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(ModelSourceError, match=r"1 missing: conv2.bias; 1 unexpected: extra.thing; "
                                               r"1 misshaped: fc.weight \[3, 3\] \(model \[10, 1024\]\)"):
        load_model("modelgraph.zoo:chain", weights=bad)
    many = tmp_path / "many.pt"
    torch.save({f"k{i}": torch.zeros(1) for i in range(25)}, many)
    with pytest.raises(ModelSourceError, match=r"25 unexpected: k0, k1, .*k9 \(\+15 more\)") as ei:
        load_model("modelgraph.zoo:chain", weights=many)
    assert "k10" not in str(ei.value)


@pytest.mark.parametrize("wrap", ["model", "state_dict", "module_prefix"])
def test_checkpoint_wrappers_and_dataparallel_prefix(perturbed_chain, tmp_path, wrap):
    module, _, _ = perturbed_chain
    sd = module.state_dict()
    obj = {f"module.{k}": v for k, v in sd.items()} if wrap == "module_prefix" else {wrap: sd, "epoch": 7}
    path = tmp_path / f"{wrap}.pt"
    torch.save(obj, path)
    lm = load_model("modelgraph.zoo:chain", weights=path)
    assert torch.equal(lm.module.fc.weight, module.fc.weight)


def test_factory_module_failing_at_import_is_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"raises_{tag}.py").write_text("raise ValueError('config missing')\n")
    (tmp_path / f"needs_{tag}.py").write_text("import no_such_dependency_coinfer\n")
    with pytest.raises(ModelSourceError, match=rf"cannot import model module 'raises_{tag}': ValueError: config miss"):
        load_model(f"raises_{tag}:make")
    with pytest.raises(ModelSourceError, match=rf"cannot import model module 'needs_{tag}': ModuleNotFoundError: "
                                               r".*no_such_dependency_coinfer"):
        load_model(f"needs_{tag}:make")


def test_torchvision_segmentation_builds_without_downloads_and_returns_its_dict():
    lm = load_model("torchvision:lraspp_mobilenet_v3_large", input_shape=(1, 3, 64, 64))
    g = capture(lm.module, lm.example_inputs, name="lraspp")
    out = run_graph(g, lm.example_inputs)
    with torch.no_grad():
        want = lm.module(*lm.example_inputs)
    assert isinstance(out, dict) and out.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(out[k], want[k], rtol=0, atol=0)


def test_weights_file_with_code_is_refused_without_running_it(factories, tmp_path):
    import importlib

    mod = importlib.import_module(factories)
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": mod.Evil()}, path)
    with pytest.raises(ModelSourceError, match=r"cannot read weights file"):
        load_model("modelgraph.zoo:chain", weights=path)
    assert mod.EVIL_RAN == []


# ---- model hash -----------------------------------------------------------------------------------
def test_model_hash_follows_the_architecture():
    a, b = capture(*chain()), capture(*chain())
    assert a.model_hash == b.model_hash and len(a.model_hash) == 20
    assert a is not b and a.structure_json() == b.structure_json()
    from modelgraph.zoo import diamond, fanout

    others = {capture(*diamond()).model_hash, capture(*fanout()).model_hash}
    assert a.model_hash not in others and len(others) == 2


def test_model_hash_stable_for_torchvision_and_input_shape_sensitive():
    hashes = []
    for shape in [(1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 96, 96)]:
        lm = load_model("torchvision:resnet18", input_shape=shape)
        hashes.append(capture(lm.module, lm.example_inputs).model_hash)
    assert hashes[0] == hashes[1] != hashes[2]


class _CondInner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: self.lin(t), lambda t: t * 2, (x,))


class _CondOuter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(torch.nn.Identity(), _CondInner())

    def forward(self, x):
        return self.blocks(x) + 1


class _WhileLoop(torch.nn.Module):
    def forward(self, x):
        from torch._higher_order_ops.while_loop import while_loop

        return while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y * 2), (torch.tensor(0), x))[1]


class _Map(torch.nn.Module):
    def forward(self, x):
        from torch._higher_order_ops.map import map as control_flow_map

        return control_flow_map(lambda row: row * 2, x)


class _GradAndAutocast(torch.nn.Module):
    """``no_grad``/``autocast`` regions are higher-order ops in torch.export's graph too, inlined by
    ``run_decompositions``: they must still capture."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            y = self.lin(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = self.lin(x)
        return y + z.float()


@pytest.mark.parametrize(("module", "line"), [
    (_CondOuter(), r"^_CondOuter\.blocks\.1 \(_CondInner\) uses torch\.cond, .*torch\.where\(pred, a, b\)"),
    (_WhileLoop(), r"^_WhileLoop uses torch\.while_loop, .*loop in Python over a fixed count"),
    (_Map(), r"^_Map uses torch's control_flow\.map, .*batched ops"),
], ids=["cond", "while_loop", "map"])
def test_control_flow_ops_are_refused_naming_the_construct_and_the_submodule(module, line):
    """Before: ``unsupported node get_attr true_graph_0`` (the sub-graph's attribute), naming neither the
    construct nor where it is, while the data-dependent refusal recommended torch.cond."""
    with pytest.raises(CaptureError, match=line) as ei:
        capture(module.eval(), (torch.randn(2, 4),))
    assert "\n" not in str(ei.value) and "get_attr" not in str(ei.value)


def test_no_grad_and_autocast_regions_still_capture():
    module = _GradAndAutocast().eval()
    x = torch.randn(2, 4)
    g = capture(module, (x,))
    with torch.inference_mode():
        assert torch.equal(run_graph(g, (x,)), module(x))


def test_a_module_in_the_current_directory_loads_from_a_console_script(tmp_path) -> None:
    """``coinfer-ue plan --model mymodels:net`` from the folder holding ``mymodels.py`` (a console script's
    ``sys.path`` has no current directory: before session 15 "no such module; is it on PYTHONPATH?"); from
    elsewhere the error names the directory it looked in."""
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("coinfer-ue") or str(Path(sys.executable).with_name("coinfer-ue"))
    (tmp_path / "mymodels.py").write_text(
        "import torch\n\ndef net():\n    return torch.nn.Linear(3, 2), (torch.randn(1, 3),)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [exe, "plan", "--model", "mymodels:net", "--uplink-mbps", "10", "--rtt-ms", "10", "--runs", "2",
            "--server-speedup", "2"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    # both processes at once: each spends seconds importing torch, on a machine with a second core
    procs = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cwd in (tmp_path, other)]
    try:
        (ok_out, ok_err), (_, bad_err) = (p.communicate(timeout=300) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ok, bad = procs
    assert ok.returncode == 0, ok_err[-2000:]
    assert "ionn" in ok_out
    assert bad.returncode != 0
    assert f"no such module on PYTHONPATH or in the current directory ({other})" in bad_err


def test_a_factory_without_example_names_the_default_example_when_capture_fails(tmp_path, monkeypatch, capsys):
    """A factory returning a module alone is tried on one 1x3x224x224 image; when that does not fit, the error
    says so and names the fix (before: torch's "a and b must have same reduction dim" alone; session 16)."""
    from ue_client import CoinferClient, InputError
    from ue_client.cli import main

    monkeypatch.syspath_prepend(str(tmp_path))
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"mlp_{tag}.py").write_text(
        "import torch\n\ndef mlp():\n    return torch.nn.Sequential(torch.nn.Linear(8, 4))\n")
    hint = "returned a module without example inputs, so it was tried on one random 1x3x224x224 float32 image"
    with pytest.raises(InputError, match=hint):
        CoinferClient(f"mlp_{tag}:mlp")
    assert main(["profile", "--model", f"mlp_{tag}:mlp", "--runs", "2"]) == 2
    assert hint in capsys.readouterr().err
    assert main(["profile", "--model", f"mlp_{tag}:mlp", "--runs", "2", "--input-shape", "2,8"]) == 0
    capsys.readouterr()
    assert main(["profile", "--model", f"mlp_{tag}:mlp", "--runs", "2", "--input-shape", "2,9"]) == 2
    assert hint not in capsys.readouterr().err  # the user's own shape: torch's message alone
    assert CoinferClient(f"mlp_{tag}:mlp", (torch.randn(2, 8),))(torch.randn(2, 8)).shape == (2, 4)


def test_a_forward_that_raises_on_the_example_is_one_line(tmp_path, monkeypatch, capsys):
    """Positions past a positional embedding: torch.export (shapes only) captured it, then the eager check's own
    ``module(*inputs)`` raised IndexError, which reached the CLI as a traceback (exit 1) and a library caller as a
    bare IndexError at a call with a new sequence length. Now a CaptureError / InputError naming it (session 16)."""
    from ue_client import CoinferClient, InputError
    from ue_client.cli import main

    monkeypatch.syspath_prepend(str(tmp_path))
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"posemb_{tag}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class PosEmb(nn.Module):
            def __init__(self):
                super().__init__()
                self.tok = nn.Embedding(10, 4)
                self.pos = nn.Embedding(8, 4)

            def forward(self, ids):
                return self.tok(ids) + self.pos(torch.arange(ids.shape[1]))

        def net():
            torch.manual_seed(0)
            return PosEmb().eval(), (torch.randint(0, 10, (2, 5)),)
        """))
    assert main(["profile", "--model", f"posemb_{tag}:net", "--runs", "2", "--input-shape", "2,12:int64"]) == 2
    err = capsys.readouterr().err
    assert "raised IndexError on the example inputs in eager mode" in err and "Traceback" not in err, err
    module, (ids,) = __import__(f"posemb_{tag}").net()
    c = CoinferClient(module, (ids,))
    assert torch.equal(c(ids), module(ids))
    with pytest.raises(InputError, match="raised IndexError on the example inputs"):
        c(torch.randint(0, 10, (2, 12)))  # a new signature, captured on these inputs
    assert torch.equal(c(ids), module(ids))


def test_inputs_that_do_not_fit_ask_about_the_inputs_given(capsys):
    """newuser32: example inputs of the wrong shape (``--input-shape 1,17`` for a ``Linear(16, ..)``) failed as
    "torch.export could not capture ... see torch.export's documentation" alone; the message now asks whether the
    inputs given fit the model, on the library's path and the CLI's."""
    from ue_client.cli import main
    from ue_client.errors import InputError
    from ue_client.model import prepare_model

    with pytest.raises(InputError, match=r"could not capture .*\(captured on the example inputs given: do they fit"):
        prepare_model(torch.nn.Linear(16, 4), (torch.randn(1, 17),))
    argv = ["plan", "--model", "modelgraph.zoo:chain", "--input-shape", "1,5,32,32", "--server-speedup", "2",
            "--uplink-mbps", "10", "--rtt-ms", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "(captured on --input-shape 1,5,32,32: do they fit the model?)" in err and err.count("\n") == 1, err
