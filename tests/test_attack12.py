"""Session 12's attacks from outside (attack12): what broke, as tests.

A slice with no ops (every op of the user's model off the server's allowlist, so the head the UE profiles is
empty; or a stranger's ``{"ops": []}``) made ``ProfileGraph`` run op 0 of nothing: INTERNAL (``IndexError``),
in process and in a profiling child. Now an empty profile (no op, total 0). A Session on the same slice
already answered (it echoes its inputs). On the UE the planner then raised on the empty graph (no samples).
"""

from __future__ import annotations

import dataclasses
import json

import grpc
import pytest
import torch
from torch import nn

from edge_server.config import ServerConfig
from edge_server.testing import ServerThread
from modelgraph.allowlist import is_allowed
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from ue_client import CoinferClient, InputError, new_tenant
from ue_client.planning import POLICIES
from ue_client.verify import max_abs_diff, within_tolerance

TIMEOUT = 120  # a profiling child forked on a loaded 2-core machine took over 30 s to answer (once in 4 runs)
F43 = {"shape": [4, 3], "dtype": "float32"}


@pytest.fixture(scope="module", params=[0, 1], ids=["in-process", "profile-child"])
def stub(request):
    cfg = ServerConfig(threads=1, profile_workers=request.param)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        yield pb_grpc.EdgeServiceStub(ch)


EMPTY = {
    "nothing": {"version": 1, "model_hash": "m", "ops": [], "inputs": {}, "outputs": [], "weights": {}},
    "echo": {"version": 1, "model_hash": "m", "ops": [], "inputs": {"x": F43}, "outputs": ["x"], "weights": {}},
}


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_a_slice_without_ops_profiles_to_an_empty_profile(stub, case: str) -> None:
    raw = json.dumps(EMPTY[case]).encode()
    r = stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=raw, iterations=2, warmup=1), timeout=TIMEOUT)
    assert len(r.ops) == 0 and r.total_mean_ms == 0.0, r
    # the server still serves: a real slice profiles after it
    one = {**EMPTY["echo"], "ops": [{"name": "r", "target": "aten.relu.default", "args": [{"t": "x"}], "kwargs": {},
                                     "outputs": [F43], "multi": False}], "outputs": ["r"]}
    r = stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=json.dumps(one).encode(), iterations=2, warmup=1),
                          timeout=TIMEOUT)
    assert [o.name for o in r.ops] == ["r"]


class AllPinned(nn.Module):
    """Every op off the server's allowlist or after one (``einsum`` is not on it): the head is empty."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(3)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bij,jkl->bikl", a, self.w).sum(-1) + torch.einsum("bi,bj->bij", b, b).sum()


@pytest.mark.parametrize("policy", POLICIES)
def test_a_model_pinned_whole_runs_on_the_ue_under_every_policy(server, policy: str) -> None:
    """Before: ``ProfileGraph`` of the empty head was INTERNAL, the UE fell back to its own op times, and the
    planner then raised on the empty graph's samples (``partitioner.robust.Spread``): with ``fallback=False``
    every request of every remote policy failed ("planner failed: IndexError")."""
    g = torch.Generator().manual_seed(1)
    module = AllPinned().eval()
    x = (torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, generator=g))
    assert not is_allowed("aten.einsum.default")
    with CoinferClient(module, x, server=server.address, policy=policy, link={"uplink_mbps": 400.0, "rtt_ms": 2.0},
                       tenant=new_tenant(), profile_runs=2, fallback=False, ue_slowdown=20.0,
                       deadline_ms=1e4 if policy == "robust" else None) as c:
        for i in range(3):
            xi = x if i == 0 else (torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, generator=g))
            y = c(*xi)
            rep = c.last_report
            assert not rep.fallback and rep.server_ops == 0 and rep.ue_ops == len(c.graph.ops), rep
            assert rep.pinned and rep.pinned[0]["target"] == "aten.einsum.default", rep.pinned
            with torch.inference_mode():
                want = module(*xi)
            assert within_tolerance(y, want) and max_abs_diff(y, c.reference(*xi)) == 0.0


class KwOnlyMask(nn.Module):
    """A required keyword-only tensor (``forward(x, *, mask)``), and an optional keyword with a default."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor, scale: float = 1.0) -> dict:
        y = self.fc(x)
        return {"y": torch.where(mask, y, -y) * scale, "n": mask.sum(-1)}


def test_a_required_keyword_only_tensor_as_example_input(server) -> None:
    """``CoinferClient(module, (x,), example_kwargs={"mask": m})``: captured with the keyword, called as
    ``client(x, mask=m)`` locally, split and at a new batch size (another signature's engine binds the
    keyword too); before, a required keyword-only tensor could not be an example input at all."""
    g = torch.Generator().manual_seed(2)
    module = KwOnlyMask().eval()

    def call(b: int) -> tuple:
        return (torch.randn(b, 8, generator=g),), {"mask": torch.rand(b, 4, generator=g) > 0.5}

    ex_args, ex_kwargs = call(2)
    for policy in ("local", "offload", "auto"):
        with CoinferClient(module, ex_args, example_kwargs=ex_kwargs, server=server.address, policy=policy,
                           link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant(), profile_runs=2,
                           fallback=False, ue_slowdown=20.0) as c:
            for b in (2, 2, 3):
                args, kwargs = call(b)
                y = c(*args, **kwargs)
                rep = c.last_report
                assert not rep.fallback, rep
                assert policy != "offload" or rep.server_ops > 0, rep
                with torch.inference_mode():
                    want = module(*args, **kwargs)
                assert within_tolerance(y, want) and max_abs_diff(y, c.reference(*args, **kwargs)) == 0.0
            with pytest.raises(InputError, match="mask"):
                c(*args)  # Python refuses a call without the required keyword; so does the client


class TrainingMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.conv(x)).mean((2, 3)))


def test_a_module_left_in_training_mode_is_switched_to_eval_with_a_warning(caplog) -> None:
    """A user who forgot ``.eval()``: the capture runs the module in eval mode (its own ``module(x)`` before gave
    training-mode outputs: batch statistics, random dropout); it says so, and the module is in eval mode after,
    so ``module(x)`` equals the client's output. Before, the switch was silent."""
    torch.manual_seed(0)
    module = TrainingMode()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert module.training
    with caplog.at_level("WARNING", logger="modelgraph.capture"):
        c = CoinferClient(module, (x,))
    assert any("training mode" in r.getMessage() and "eval" in r.getMessage() for r in caplog.records), caplog.text
    assert not module.training and not module.bn.training
    with torch.inference_mode():
        want = module(x)
    assert within_tolerance(c(x), want)


class CallCounter(nn.Module):
    """A forward that counts its calls in a plain attribute and uses the count (or branches on it)."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.calls = 0
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.branch:
            return self.fc(x).relu() if self.calls > 3 else self.fc(x)
        return self.fc(x) * self.calls


@pytest.mark.parametrize("branch", [False, True], ids=["scale", "branch"])
def test_a_forward_that_changes_python_state_is_refused(branch: bool) -> None:
    """Before: captured (the export restores the attribute, the eager check ran once and agreed), then every
    call returned the value of call 1 while the user's module moved on (``x * n``: 1.28 off at call 2, 6.4 at
    call 6; the branch: 0.68 off from call 4): a silent wrong answer. Now one line naming the attribute."""
    module = CallCounter(branch).eval()
    with pytest.raises(InputError, match=r"CallCounter\.calls \(0 -> 1\)"):
        CoinferClient(module, (torch.randn(2, 8),))


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor


class DataclassOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> _Out:
        return _Out(self.fc(x))


def test_a_dataclass_output_is_refused_naming_the_class() -> None:
    """Before, the line quoted torch's message cut at 120 characters ("... you need to register a pytre")."""
    with pytest.raises(InputError, match=r"returns an unsupported value a .*_Out \(a dataclass.*namedtuples") as ei:
        CoinferClient(DataclassOut().eval(), (torch.randn(2, 8),))
    assert "\n" not in str(ei.value)
