"""Session 13's attack from outside (attack13): what a new user and a stranger on the wire found.

A user's weights changed after the client was built (``load_state_dict``, an optimizer step, a parameter
replaced, ``module.double()``): the local path read the module's tensors in place while the server kept the
weights it was sent (content-addressed by the sha256 the client computed once), so an offloaded request
answered with the old weights and the local one with the new (0.14 max|diff| from the user's
``model(x)`` after ``weight.mul_(2)``); a replaced parameter left every path on the old one. Now the
client refuses the call in one line (``ue_client.model.WeightWatch``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.checks import warm_client
from ue_client import CoinferClient, InputError, new_tenant
from ue_client.verify import max_abs_diff

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}


class Functional(nn.Module):
    """Functional calls on parameters, and a tied weight read twice."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3, generator=g) * 0.2)
        self.b = nn.Parameter(torch.randn(6, generator=g) * 0.1)
        self.fw = nn.Parameter(torch.randn(10, 6, generator=g) * 0.2)
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.w, self.b, padding=1))
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.bn(F.linear(y, self.fw)) @ self.fw


def _change(module: Functional, how: str) -> None:
    if how == "in_place":
        with torch.no_grad():
            module.w.mul_(2.0)
    elif how == "load_state_dict":
        module.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in module.state_dict().items()})
    elif how == "replaced":
        module.fw = nn.Parameter(torch.randn(10, 6))
    elif how == "train_step":  # the user runs the module in training mode: batch-norm's running statistics move
        module.train()
        module(torch.randn(4, 3, 8, 8))
        module.eval()
    elif how == "dtype":
        module.double()


@pytest.mark.parametrize("how", ["in_place", "load_state_dict", "replaced", "train_step", "dtype"])
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_weights_changed_after_the_client_was_built_are_refused(server, policy: str, how: str) -> None:
    module = Functional().eval()
    x = torch.randn(2, 3, 8, 8)
    with warm_client(server, module, x, policy) as (c, _):
        _change(module, how)
        with pytest.raises(InputError, match="after the client captured it"):
            c(x.double() if how == "dtype" else x)
        with pytest.raises(InputError, match="after the client captured it"):
            c.reference(x)


def test_a_new_input_signature_and_the_eager_check_do_not_trip_the_watch(server) -> None:
    """Capturing another batch size from the module (torch.export swaps its parameters meanwhile) and the
    client's own eager comparison leave the weights as they were: no refusal."""
    module = Functional().eval()
    x1, x4 = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with CoinferClient(module, (x1,), server=server.address, policy="offload", link=FAST, tenant=new_tenant(),
                       profile_runs=2, fallback=False) as c:
        for x in (x1, x4, x1, x4):
            y = c(x)
            with torch.inference_mode():
                assert max_abs_diff(y, module(x)) <= 1e-5
            c.eager(x)


class PrivateCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self._calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._calls += 1
        return self.fc(x) * self._calls


class ConfigDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.cfg = {"t": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cfg["t"] *= 2
        return self.fc(x) * self.cfg["t"]


class TensorAttr(nn.Module):
    """A plain tensor attribute (not a buffer) the forward reads and replaces."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = torch.ones(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale = self.scale * 2
        return self.fc(x) * self.scale


@pytest.mark.parametrize("cls, attr", [(PrivateCounter, r"PrivateCounter\._calls \(0 -> 1\)"),
                                       (ConfigDict, r"ConfigDict\.cfg \(\{'t': 1\.0\} -> \{'t': 2\.0\}\)"),
                                       (TensorAttr, r"TensorAttr\.scale \(tensor\(4,\) \(version 0\) replaced")])
def test_a_forward_that_changes_private_container_or_tensor_state_is_refused(cls, attr: str) -> None:
    """Before: captured, and every call returned call 1's value while ``model(x)`` moved on (``self._calls``:
    0.98 off at call 1, 2.9 at call 3; the dict 7.3 at call 3; the tensor 13.4): session 12's check read
    public scalars only."""
    with pytest.raises(InputError, match=attr):
        CoinferClient(cls().eval(), (torch.randn(2, 4),))


class KeepsActivation(nn.Module):
    """Keeps its last activation on ``self`` (for inspection) and reads a temperature it never changes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.temperature = 1.0
        self.unused = torch.zeros(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        self.last = y.detach()
        return y / self.temperature


@pytest.mark.parametrize("policy", ["local", "offload"])
def test_python_state_changed_between_calls_is_refused(server, policy: str) -> None:
    """A forward that only writes an activation on ``self`` is not refused, nor is a tensor attribute the graph
    never reads being replaced; the user changing what the graph was specialised on (``temperature``) is
    (before: every path kept dividing by 1.0 while ``model(x)`` divided by 3.0, 0.85 off)."""
    module = KeepsActivation().eval()
    x = torch.randn(2, 4)
    with warm_client(server, module, x, policy) as (c, _):
        module.unused = torch.ones(2)
        assert max_abs_diff(c(x), module(x).detach()) <= 1e-5
        module.temperature = 3.0
        with pytest.raises(InputError, match=r"KeepsActivation\.temperature changed \(1\.0 -> 3\.0\)"):
            c(x)


def test_a_module_switched_back_to_training_mode_is_refused_until_eval() -> None:
    """The client computes in eval mode (capture switches the module); after ``module.train()`` the user's
    ``model(x)`` drops activations out while the client did not (a silent difference before)."""
    module = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 8)
    c = CoinferClient(module, (x,))
    c(x)
    module[1].train()
    with pytest.raises(InputError, match=r"switched to training mode.*module\.eval\(\)"):
        c(x)
    module.eval()
    with torch.inference_mode():
        assert max_abs_diff(c(x), module(x)) == 0.0


def test_a_capture_of_the_same_module_in_another_thread_is_not_a_change() -> None:
    """``torch.export`` swaps a module's parameters for fake tensors while it runs: calls racing a capture of
    the same module in another thread (another input signature, another client) were refused as "replaced"
    (187,949 refusals beside 6 captures in a first run of this race, after WeightWatch landed); the watch
    re-checks under the trace lock every capture holds."""
    import threading

    import modelgraph as mg

    module = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    c = CoinferClient(module, (torch.randn(2, 8),))
    done = threading.Event()

    def capture_more() -> None:
        try:
            for b in range(3, 7):
                mg.capture(module, (torch.randn(b, 8),), name=f"b{b}")
        finally:
            done.set()

    t = threading.Thread(target=capture_more)
    t.start()
    x, calls = torch.randn(2, 8), 0
    try:
        while not done.is_set() or calls == 0:
            c(x)
            calls += 1
    finally:
        t.join(120)
    with torch.inference_mode():
        assert max_abs_diff(c(x), module(x)) == 0.0


def test_a_claim_correction_of_a_session_in_planner_debt_waits_for_its_bucket() -> None:
    """ARA re-plans a session whose claimed server costs exceed what the server measured (``on_measured`` ->
    a "measured" job). Joins and profile updates of an identity in planner debt wait for its bucket; the
    correction's re-plan did not: it ran at once, however deep the debt (charged, never deferred), so a UE
    whose measured op times kept falling by more than ``RECALIBRATE_FACTOR`` (new, smaller slices with the
    same op names) got a re-plan of every profiled session per step outside its budget. Now it waits too."""
    from edge_server.allocation import AraShareAllocator, SessionInfo
    from partitioner import chain
    from protos.values import OpTime, UeProfile
    from tests.waiting import wait_until

    graph = chain([(40.0, 2.0, 4_000, 200_000)] * 50, input_bytes=4_000).to_json()
    alloc = AraShareAllocator(policy="neurosurgeon", plan_cpu_share=1e-3, plan_cpu_burst_s=0.0,
                              plan_cpu_global_share=0.0)
    info = SessionInfo("s1", "t", "m", planner_key="peer:one")
    info.extra["profile"] = UeProfile(cost_graph_json=graph, uplink_mbps=20.0, rtt_ms=5.0)
    try:
        alloc.on_join(info)
        assert alloc.wait_idle(120) and "s1" in alloc._ara
        replans, deferred = alloc.replans, alloc.deferred
        alloc.on_measured("s1", [OpTime(f"op{i}", 0.0, 1e-3) for i in range(50)])  # 2000x below the claim
        wait_until(lambda: alloc.replans > replans or alloc.deferred > deferred,
                   what="the correction planned or deferred", timeout=60)
        assert alloc.replans == replans and alloc.deferred == deferred + 1, (alloc.replans, alloc.deferred)
    finally:
        alloc.close()


def test_legacy_spectral_norm_is_not_refused() -> None:
    """``nn.utils.spectral_norm`` (the legacy hook) keeps ``weight`` as a plain attribute aliasing the
    parameter ``weight_orig`` and replaces it every forward: the first version of the tensor-attribute
    check refused it as a forward that replaces a tensor the graph reads. The parameter is what the graph
    reads (and ``WeightWatch`` watches); aliases of parameters and buffers are not user state."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4)), nn.ReLU(),
                               nn.utils.weight_norm(nn.Linear(4, 2))).eval()
    c = CoinferClient(module, (torch.randn(3, 4),))
    for _ in range(3):
        x = torch.randn(3, 4)
        y = c(x)
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) == 0.0
