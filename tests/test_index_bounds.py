"""A client's index tensors are checked before a kernel reads them (``modelgraph.index_bounds``).

Session 28: ``embedding_bag`` with offsets ``[0, -1e8]`` (made on the server by ``arange``, from 1 KB of JSON)
segfaulted the edge server; offsets ``[0, -1]`` read the 8 bytes before the indices and sent them back in the
error. On CUDA every out-of-range index of these ops is a device-side assert that leaves the context unusable.
The check must refuse every index outside the op's domain and nothing eager PyTorch runs.
"""

from __future__ import annotations

import itertools
import json

import grpc
import pytest
import torch

from modelgraph.allowlist import ALLOWED_OPS, resolve
from modelgraph.index_bounds import INDEX_OPS, checked

A = torch.ops.aten
X = torch.arange(12.0).reshape(3, 4)
VALUES = (-6, -5, -4, -3, -1, 0, 2, 3, 4, 5, 1 << 40, -(1 << 40))


def _fn(target: str):
    return checked(target, resolve(target))


def _same(a, b) -> bool:
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _agree(target: str, args: tuple, in_domain: bool, *, ub: bool = False) -> None:
    """The checked op refuses (IndexError) every call outside ``in_domain``; inside it, it answers what the
    kernel answers, or refuses as the kernel does. ``ub``: the kernel itself must not be called (it reads outside
    its tensors on such input)."""
    fn = _fn(target)
    if not in_domain:
        with pytest.raises(IndexError, match=r"outside|non-decreasing|no bag"):  # the check's, not the kernel's own
            fn(*args)
        if ub:
            return
        with pytest.raises((IndexError, RuntimeError)):  # eager refuses it too (on CPU)
            resolve(target)(*args)
        return
    try:
        want = resolve(target)(*args)
    except (IndexError, RuntimeError):  # a host check of the kernel's own: the same refusal through the check
        with pytest.raises((IndexError, RuntimeError)):
            fn(*args)
        return
    assert _same(fn(*args), want), (target, args)


@pytest.mark.parametrize("target", ["aten.index_select.default", "aten.gather.default", "aten.scatter.src",
                                    "aten.scatter.value", "aten.scatter_add.default"])
def test_a_dim_index_is_checked_against_its_dim(target: str) -> None:
    for dim, v in itertools.product((0, 1, -1, -2), VALUES):
        n = X.shape[dim]
        if target == "aten.index_select.default":
            args = (X, dim, torch.tensor([0, v]))
        elif target == "aten.gather.default":
            args = (X, dim, torch.tensor([[v]]))
        elif target == "aten.scatter.value":
            args = (X, dim, torch.tensor([[v]]), 7.0)
        else:
            args = (X, dim, torch.tensor([[v]]), torch.full((1, 1), 7.0))
        _agree(target, args, 0 <= v < n)


def test_embedding_indices_are_rows_of_the_weight() -> None:
    for v, dtype in itertools.product(VALUES, (torch.int64, torch.int32)):
        if abs(v) >= 1 << 31 and dtype == torch.int32:
            continue
        _agree("aten.embedding.default", (X, torch.tensor([0, v], dtype=dtype)), 0 <= v < 3)


@pytest.mark.parametrize("target", ["aten.index.Tensor", "aten.index_put.default"])
def test_advanced_indices_are_checked_per_dim_masks_included(target: str) -> None:
    put = target == "aten.index_put.default"
    mask = torch.tensor([True, False, True])
    for v in VALUES:
        for indices, n in (([torch.tensor([v])], 3), ([None, torch.tensor([v])], 4),
                           ([torch.tensor([0]), torch.tensor([v])], 4), ([mask, torch.tensor([v])], 4),
                           ([torch.tensor(True), torch.tensor([v])], 3)):  # a 0-dim mask takes no dim
            args = (X, indices, torch.tensor(9.0)) if put else (X, indices)
            _agree(target, args, -n <= v < n)


def _bag_args(target: str, indices: list[int], offsets: list[int], last: bool) -> tuple:
    i, o = torch.tensor(indices), torch.tensor(offsets)
    if target == "aten.embedding_bag.padding_idx":
        return (X, i, o, False, 0, False, None, last, None)
    return (X, i, o, False, 0, False, None, last)


@pytest.mark.parametrize("target", ["aten.embedding_bag.default", "aten.embedding_bag.padding_idx",
                                    "aten._embedding_bag.default"])
def test_embedding_bag_offsets_stay_inside_the_indices(target: str) -> None:
    """Offsets that are negative or decrease make the CPU kernel read outside the indices (a fault or a leak):
    refused without calling it; the rest agree with the kernel."""
    indices = [0, 1, 2]
    offset_cases = [[0], [0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [0, -1], [0, -100_000_000], [0, 2, 1], [1, 2],
                    [0, 1, 3], [0, 3, 3], [0, 1 << 40]]
    for offsets, last in itertools.product(offset_cases, (False, True)):
        # (no bag for the indices, [0] with the last offset closing: refused since break29 H1, whose max mode and
        # padding_idx forms fault the kernel; the sum form answers an empty bag list, which no model asks for)
        bags = len(offsets) - last
        safe = min(offsets) >= 0 and offsets == sorted(offsets) and max(offsets) <= len(indices) and bags > 0
        _agree(target, _bag_args(target, indices, offsets, last), safe, ub=not safe)
    for v in VALUES:  # the indices themselves: rows of the weight
        _agree(target, _bag_args(target, [0, v, 1], [0, 1], False), 0 <= v < 3)


def test_every_allowlisted_op_that_reads_indices_is_checked() -> None:
    """A new allowlisted op with an index argument must join ``INDEX_OPS`` (or be shown safe and named here)."""
    readers = set()
    for target in ALLOWED_OPS:
        schema = resolve(target)._schema
        for a in schema.arguments:
            if str(a.type).startswith("Tensor") and any(k in a.name for k in ("index", "indices", "offsets")):
                readers.add(target)
    assert readers <= INDEX_OPS, sorted(readers - INDEX_OPS)
    assert INDEX_OPS <= ALLOWED_OPS


def test_the_checks_leave_meta_and_empty_tensors_alone() -> None:
    fn = _fn("aten.gather.default")
    meta = torch.empty(3, 4, device="meta")
    assert fn(meta, 1, torch.empty(3, 1, dtype=torch.int64, device="meta")).shape == (3, 1)
    assert fn(X, 1, torch.empty(0, 1, dtype=torch.int64)).shape == (0, 1)


def test_a_clients_program_checks_and_the_ues_own_does_not() -> None:
    """The server runs a client's slice as an untrusted Program (checked); the UE runs its own graph trusted."""
    from modelgraph.execute import Program
    from modelgraph.graph import OpNode
    from modelgraph.tensors import TensorMeta

    op = OpNode("g", "aten.gather.default", ({"t": "x"}, 1, {"t": "i"}), {}, (TensorMeta.of(torch.empty(3, 1)),))
    env = {"x": X, "i": torch.tensor([[0], [9], [1]])}
    with pytest.raises(Exception, match="index holds 9, outside \\[0, 4\\)"):
        Program((op,), frozenset({"g"})).run(dict(env), {})
    with pytest.raises(Exception, match="out of bounds"):  # the kernel's own message
        Program((op,), frozenset({"g"}), trusted=True).run(dict(env), {})


# ---- from outside: a stranger's ProfileGraph against a real server process ------------------------------------
def _arange_offsets(off: int) -> dict:
    return {"name": "off", "target": "aten.arange.start_step", "args": [0, 2 * off, off],
            "kwargs": {"dtype": {"dtype": "int64"}, "device": {"device": None}, "pin_memory": False},
            "outputs": [{"shape": [2], "dtype": "int64"}]}


def _bag_spec(off: int) -> bytes:
    from tests.slice_json import meta, zeros

    ops = [zeros("w", [3, 4]), zeros("idx", [3], "int64"), _arange_offsets(off),
           {"name": "eb", "target": "aten.embedding_bag.default", "args": [{"t": "w"}, {"t": "idx"}, {"t": "off"}],
            "kwargs": {}, "multi": True,
            "outputs": [meta([2, 4]), meta([3], "int64"), meta([2], "int64"), meta([2], "int64")]},
           {"name": "y", "target": "aten.add.Tensor", "args": [{"t": "eb#0"}, {"t": "x"}], "kwargs": {},
            "outputs": [meta([2, 4])]}]
    return json.dumps({"version": 1, "ops": ops, "inputs": {"x": meta([2, 4])}, "outputs": ["y"],
                       "weights": {}}).encode()


def test_a_strangers_embedding_bag_cannot_fault_or_read_the_server() -> None:
    """Before the check the first call below killed ``coinfer-edge serve`` (SIGSEGV, exit -11) and the second
    answered INVALID_ARGUMENT quoting a value read from outside the tensor."""
    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
    from tests.test_server_cli import running_server

    with running_server("--threads", "1") as (proc, address):
        ch = grpc.insecure_channel(address)
        stub = pbg.EdgeServiceStub(ch)
        for off in (-100_000_000, -1):
            with pytest.raises(grpc.RpcError) as e:
                stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=_bag_spec(off), iterations=1, warmup=0),
                                  timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert f"offsets hold {off}, outside [0, 3]" in e.value.details()
            assert proc.poll() is None
        # a valid bag still runs, and the server keeps answering
        r = stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=_bag_spec(1), iterations=1, warmup=0), timeout=60)
        assert r.ops
        assert stub.Hello(pb.HelloRequest(client_version="t"), timeout=20).server_version
        ch.close()
