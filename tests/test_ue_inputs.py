"""What users hand the device runtime: `--input-shape`, `--input` files, numpy arrays, layouts, server
addresses, and result comparison by structure. Fast: no server, no capture (except the CLI ones)."""

from __future__ import annotations

import json

import pytest
import torch

from ue_client.errors import InputError
from ue_client.inputs import (
    InputSpec,
    example_inputs,
    load_inputs,
    load_pt,
    parse_input_shapes,
    parse_server_address,
)
from ue_client.verify import ResultMismatch, max_abs_diff, structure, within_tolerance


# ---- --input-shape --------------------------------------------------------------------------------------
def test_input_shapes_with_dtypes_and_several_inputs():
    assert parse_input_shapes("1,3,224,224") == (InputSpec((1, 3, 224, 224), torch.float32),)
    assert parse_input_shapes("1x3x8x8:float64") == (InputSpec((1, 3, 8, 8), torch.float64),)
    assert parse_input_shapes("1,3,224,224:float32;1,128:int64") == (
        InputSpec((1, 3, 224, 224), torch.float32),
        InputSpec((1, 128), torch.int64),
    )
    assert parse_input_shapes("2,5:long; 3:bool")[0].dtype == torch.int64


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "names no input"),
        ("1,a", "must look like"),
        ("1,0,3", "positive"),
        ("1,3:float99", "unknown dtype"),
        ("1,3:__class__", "unknown dtype"),
    ],
)
def test_bad_input_shapes_are_refused(text, needle):
    with pytest.raises(InputError, match=needle):
        parse_input_shapes(text)


def test_example_inputs_keep_int_inputs_in_the_example_range():
    default = (torch.randn(1, 3), torch.tensor([[3, 7, 5]]))
    ex = example_inputs(parse_input_shapes("4,3:float32;4,100:int64"), default)
    assert ex[0].shape == (4, 3) and ex[0].dtype == torch.float32
    assert ex[1].shape == (4, 100) and ex[1].dtype == torch.int64
    assert int(ex[1].min()) >= 3 and int(ex[1].max()) <= 7
    assert example_inputs(None, default) is default or example_inputs(None, default) == default
    with pytest.raises(InputError, match="gives 1 input"):
        example_inputs(parse_input_shapes("1,3"), default)


def test_random_inputs_are_seeded_and_typed_like_the_example():
    example = (torch.zeros(2, 3), torch.tensor([[0, 9]]))
    a, b = load_inputs("random", example, seed=5), load_inputs("random", example, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].dtype == torch.int64 and int(a[1].max()) <= 9


# ---- --input FILE.pt --------------------------------------------------------------------------------------
def test_pt_file_holding_a_tensor_a_tuple_or_a_dict(tmp_path):
    ex = (torch.zeros(1, 3), torch.zeros(1, 4, dtype=torch.int64))
    img, ids = torch.randn(1, 3), torch.randint(0, 5, (1, 4))
    for obj in ((img, ids), [img, ids], {"image": img, "ids": ids}, {"ids": ids, "image": img}):
        p = tmp_path / "x.pt"
        torch.save(obj, p)
        got = load_pt(p, ex, names=["image", "ids"])
        assert torch.equal(got[0], img) and torch.equal(got[1], ids), type(obj)
    torch.save({"a": img, "b": ids}, tmp_path / "o.pt")  # other keys: taken in order
    got = load_pt(tmp_path / "o.pt", ex, names=["image", "ids"])
    assert torch.equal(got[0], img)
    torch.save(torch.randn(3), tmp_path / "one.pt")  # the batch dimension of a batch-1 input is added
    assert load_pt(tmp_path / "one.pt", (torch.zeros(1, 3),))[0].shape == (1, 3)


def test_pt_file_dtype_mismatch_is_refused_not_cast(tmp_path):
    p = tmp_path / "f.pt"
    torch.save(torch.randn(1, 8), p)
    with pytest.raises(InputError, match=r"tokens is float32; the model expects int64"):
        load_pt(p, (torch.zeros(1, 8, dtype=torch.int64),), names=["tokens"])


@pytest.mark.parametrize(
    "obj, needle",
    [
        ({"a": 1}, "must hold a tensor"),
        ((torch.zeros(1, 3),) * 2, "holds 2 tensor"),
        (torch.zeros(1, 5), "has shape [1, 5]"),
    ],
)
def test_pt_file_bad_contents(tmp_path, obj, needle):
    p = tmp_path / "x.pt"
    torch.save(obj, p)
    with pytest.raises(InputError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_pt(p, (torch.zeros(1, 3),))


def test_pt_file_that_needs_code_to_load_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "f": InputSpec((1,))}, p)  # a pickled class: weights_only refuses
    with pytest.raises(InputError, match="cannot read tensor file"):
        load_pt(p, (torch.zeros(1),))


def test_pt_file_that_is_not_a_torch_file_says_what_it_expects(tmp_path):
    """newuser32: a text file said only "KeyError: 101"."""
    p = tmp_path / "text.pt"
    p.write_text("hello")
    with pytest.raises(InputError, match=r"cannot read tensor file .*Expected tensors saved with torch.save\(x,"):
        load_pt(p, (torch.zeros(1),))


# ---- server addresses -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("localhost:1", "localhost:1"),
        ("[::1]:65535", "[::1]:65535"),
        (" edge-1.lan:80 ", "edge-1.lan:80"),
        ("unix:/tmp/s.sock", "unix:/tmp/s.sock"),
    ],
)
def test_server_addresses_accepted(text, want):
    assert parse_server_address(text) == want


@pytest.mark.parametrize(
    "text, needle",
    [
        ("127.0.0.1:99999", "out of range 1-65535"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1", "needs a port"),
        ("http://h:1", "without a scheme"),
        ("::1:50051", "in brackets"),
        ("[::1]", "needs a port"),
        ("h:x", "not a number"),
        ("", "empty"),
        ("bad host:1", "not a host name"),
    ],
)
def test_server_addresses_refused(text, needle):
    with pytest.raises(InputError, match=needle):
        parse_server_address(text)


# ---- comparing results by structure -------------------------------------------------------------------------
def test_results_compare_by_structure_then_values():
    t = torch.arange(4.0)
    a = {"heads": [t, (t, None)], "extra": {"scale": 2.0}}
    b = {"heads": [t.clone(), (t + 1e-7, None)], "extra": {"scale": 2.0}}
    assert 0 < max_abs_diff(a, b) < 1e-6 and within_tolerance(a, b)
    assert structure(a) == "{'heads': ['T', ('T', None)], 'extra': {'scale': 2.0}}"
    with pytest.raises(ResultMismatch, match="structures differ"):
        max_abs_diff({"logits": t}, (t,))
    with pytest.raises(ResultMismatch, match="leaf 1 differs"):
        max_abs_diff((t, 2.0), (t, 3.0))
    with pytest.raises(ResultMismatch, match="int64"):
        max_abs_diff(t, t.long())
    assert max_abs_diff(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0])) == 0.0
    assert max_abs_diff(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
    assert not within_tolerance(torch.tensor([1, 2]), torch.tensor([1, 3]))


# ---- through the CLI (in-process: the same main() the console script runs) ----------------------------------
def _one_line(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = [x for x in err.strip().splitlines() if x]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("server, needle", [("127.0.0.1:99999", "out of range 1-65535"), ("127.0.0.1", "needs a port")])
def test_cli_bad_server_address_one_line_exit_2_and_json_written(cli, tmp_path, server, needle):
    out = tmp_path / "r.json"
    rc, _, err = cli("run", "--server", server, "--model", "tests.user_zoo:int_input", "--json", str(out))
    assert needle in _one_line(rc, err)
    d = json.loads(out.read_text())
    assert d["requests"] == [] and needle in d["error"]


def test_cli_float_file_for_int_input_refused(cli, tmp_path):
    x = tmp_path / "x.pt"
    torch.save(torch.randn(1, 8), x)
    rc, _, err = cli(
        "run", "--server", "127.0.0.1:1", "--model", "tests.user_zoo:int_input", "--policy", "local", "--input", str(x)
    )
    assert "tokens is float32; the model expects int64" in _one_line(rc, err)


def test_cli_profile_sizes_int_and_several_inputs_from_input_shape(cli, tmp_path):
    out = tmp_path / "p.json"
    rc, _, err = cli(
        "profile",
        "--model",
        "tests.user_zoo:several_inputs",
        "--input-shape",
        "1,3,16,16:float32;1,5;1,6:int64",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
    )
    assert rc == 0, err
    assert json.loads(out.read_text())["ops"]
    rc, _, err = cli("profile", "--model", "tests.user_zoo:int_input", "--input-shape", "1,8:float32", "--runs", "2")
    assert "indices" in _one_line(rc, err)  # torch names what the embedding wanted (Long, Int)
    rc, _, err = cli("profile", "--model", "tests.user_zoo:int_input", "--input-shape", "1,8:int64;1,2", "--runs", "2")
    assert "gives 2 input(s)" in _one_line(rc, err)
